import torch

from sparse_unsloth.patch.state import token_split


def _labels(rows):
    return torch.tensor(rows)


def test_right_padding():
    # prompt (-100), answer (ids), then right padding (-100)
    labels = _labels([[-100, -100, 5, 6, -100, -100], [-100, 7, 8, 9, 4, -100]])
    split = token_split(labels, labels.shape, torch.device("cpu"))
    assert split.dense_idx.tolist() == [1, 2, 3, 6, 7, 8, 9, 10]
    assert sorted(split.dense_idx.tolist() + split.sparse_idx.tolist()) == list(range(12))


def test_left_padding():
    labels = _labels([[-100, -100, -100, -100, 5, 6], [-100, -100, 7, 8, 9, 4]])
    split = token_split(labels, labels.shape, torch.device("cpu"))
    assert split.dense_idx.tolist() == [3, 4, 5, 7, 8, 9, 10, 11]


def test_padding_free_flattened_batch():
    # two packed sequences in one row: outputs sit in the middle and at the end
    labels = _labels([[-100, -100, 3, 4, -100, -100, -100, 8]])
    split = token_split(labels, labels.shape, torch.device("cpu"))
    assert split.dense_idx.tolist() == [1, 2, 3, 6, 7]


def test_no_labels_or_sparse_outputs_make_every_token_context():
    labels = _labels([[-100, 5, 6]])
    for split in (token_split(None, labels.shape, torch.device("cpu")),
                  token_split(labels, labels.shape, torch.device("cpu"), dense_output_tokens=False)):
        assert split.dense_idx.numel() == 0 and split.sparse_idx.tolist() == [0, 1, 2]


def test_label_shape_mismatch_is_an_error():
    import pytest
    with pytest.raises(ValueError, match="labels hold 3 tokens but the layer sees 4"):
        token_split(_labels([[-100, 5, 6]]), torch.Size([2, 2]), torch.device("cpu"))


def test_sequence_means_average_each_rows_context_tokens():
    labels = _labels([[-100, -100, -100, 5], [-100, -100, 8, 9], [3, 4, 5, 6]])
    split = token_split(labels, labels.shape, torch.device("cpu"))
    hidden = torch.arange(24, dtype=torch.float64).view(3, 4, 2)
    # row 0: tokens 0-1 are context (2 predicts the label at 3); row 1: token 0 only;
    # row 2: every token is an output token, so its row is zero (it scores no channel)
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1, :1].mean(0), torch.zeros(2, dtype=torch.float64)])
    torch.testing.assert_close(split.sequence_means(hidden), expected)
