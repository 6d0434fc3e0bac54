import pytest
import torch

from sparse_unsloth.estimator.select import attn_channels, ffn_channels
from sparse_unsloth.ops.sparse_mm import unpacked
from sparse_unsloth.patch.state import (
    DENSE_ROWS_STEP,
    attn_choice_sizes,
    choose_attn,
    choose_mlp,
    sequence_means,
    token_split,
    voting_rows,
)


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
    torch.testing.assert_close(sequence_means(hidden.reshape(-1, 2), split.sequence_matrix(torch.float64)), expected)


@pytest.mark.parametrize("dense_per_row", [0, 1, 7, DENSE_ROWS_STEP // 2])
def test_dense_rows_are_padded_by_repeating_the_first(dense_per_row):
    labels = torch.full((2, DENSE_ROWS_STEP), -100)
    if dense_per_row:
        labels[:, -dense_per_row:] = 3
    split = token_split(labels, labels.shape, torch.device("cpu"))
    rows = split.dense_rows
    if not dense_per_row:
        assert rows is None
        return
    n = split.dense_idx.numel()
    assert rows.numel() % DENSE_ROWS_STEP == 0 and rows.numel() - n < DENSE_ROWS_STEP
    assert torch.equal(rows[:n], split.dense_idx)
    assert (rows[n:] == split.dense_idx[0]).all()


def test_static_shape_choice_equals_the_gathered_rows():
    """The channel choice scores zeroed non-voting rows instead of gathering the voting ones (so
    that its shapes do not depend on the labels): the same channels."""
    gen = torch.Generator().manual_seed(5)
    labels = torch.full((3, 10), -100)
    labels[0, 6:] = 1
    labels[2, 2:] = 4
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0                                  # left padding never votes
    split = token_split(labels, labels.shape, torch.device("cpu"), attention_mask=mask)
    hidden = torch.randn(3, 10, 12, dtype=torch.float64, generator=gen).reshape(-1, 12)
    rows = hidden[split.sparse_idx]
    torch.testing.assert_close(voting_rows(hidden, split.vote_rows)[split.sparse_idx], rows)

    def factors(out):
        return (torch.randn(12, 4, dtype=torch.float64, generator=gen),
                torch.randn(4, out, dtype=torch.float64, generator=gen))

    gate, up = factors(40), factors(40)
    (idx,) = choose_mlp(hidden, split.vote_rows, None, *gate, *up, 9, False)
    assert torch.equal(idx, ffn_channels(rows, gate, up, 9))
    means = torch.stack([hidden[split.sparse_idx[split.sparse_idx // 10 == b]].mean(0) for b in range(3)])
    (idx,) = choose_mlp(hidden, split.vote_rows, split.sequence_matrix(torch.float64), *gate, *up, 9, True)
    assert torch.equal(idx, ffn_channels(means, gate, up, 9))
    heads, kv_heads, head_dim = 4, 2, 5
    q, k, v = factors(heads * head_dim), factors(kv_heads * head_dim), factors(kv_heads * head_dim)
    for biases in ((None, None, None), tuple(10 * torch.randn(f[1].shape[1], dtype=torch.float64, generator=gen)
                                             for f in (q, k, v))):
        # with biases (Qwen2) the zeroed rows must count for nothing too, not for the bias alone
        (flat,) = choose_attn(hidden, split.vote_rows, *q, *k, *v, *biases, heads, kv_heads, head_dim, 2)
        got = unpacked(flat, attn_choice_sizes(heads, kv_heads, 2))
        want = attn_channels(rows, q, k, v, heads, kv_heads, head_dim, 2, biases=biases)   # voting rows gathered
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_the_split_never_waits_on_nonzero(monkeypatch):
    """The rows' count sets their shapes, so finding the rows with ``nonzero`` makes the host wait
    for the GPU to finish everything queued. The split copies the two counts to the host when it
    is made and sizes ``nonzero_static`` by them: no ``nonzero`` at all."""
    def refuse(*args, **kwargs):
        raise AssertionError("nonzero called")

    monkeypatch.setattr(torch.Tensor, "nonzero", refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    labels = _labels([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    split = token_split(labels, labels.shape, torch.device("cpu"))
    assert split.counts == (6, 2) and split.num_tokens == 8
    assert split.dense_idx.tolist() == [1, 2, 3, 4, 5, 6] and split.sparse_idx.tolist() == [0, 7]
    assert split.vote_rows.tolist() == [True, False, False, False, False, False, False, True]
    assert split.dense_rows.numel() == DENSE_ROWS_STEP


def test_packed_sequences_are_averaged_apart_by_their_position_ids():
    """A padding-free batch (Unsloth's default with TRL) packs its sequences into one row; its
    position ids start again at each sequence: each sequence gets its own mean, the means of the
    same sequences batched with padding, so the FFN channels chosen are the same."""
    gen = torch.Generator().manual_seed(7)
    seqs = [(_labels([-100, -100, -100, 5, 6]), 5), (_labels([-100, -100, 8]), 3), (_labels([-100, 1, 2, 3]), 4)]
    hidden = [torch.randn(n, 6, dtype=torch.float64, generator=gen) for _, n in seqs]
    packed_labels = torch.cat([lab for lab, _ in seqs]).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for _, n in seqs]).unsqueeze(0)
    split = token_split(packed_labels, packed_labels.shape, torch.device("cpu"), position_ids=positions)
    assert split.sequences == 3 and split.sequence_ids.tolist() == [0] * 5 + [1] * 3 + [2] * 4
    means = sequence_means(torch.cat(hidden), split.sequence_matrix(torch.float64))

    padded_labels = torch.full((3, 5), -100)
    padded_hidden = torch.zeros(3, 5, 6, dtype=torch.float64)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for row, ((lab, n), h) in enumerate(zip(seqs, hidden)):
        padded_labels[row, :n], padded_hidden[row, :n], mask[row, :n] = lab, h, 1
    padded = token_split(padded_labels, padded_labels.shape, torch.device("cpu"), attention_mask=mask)
    torch.testing.assert_close(means, sequence_means(padded_hidden.reshape(-1, 6),
                                                     padded.sequence_matrix(torch.float64)))
    gate = (torch.randn(6, 3, dtype=torch.float64, generator=gen), torch.randn(3, 20, dtype=torch.float64, generator=gen))
    up = (torch.randn(6, 3, dtype=torch.float64, generator=gen), torch.randn(3, 20, dtype=torch.float64, generator=gen))
    (got,) = choose_mlp(torch.cat(hidden), split.vote_rows, split.sequence_matrix(torch.float64), *gate, *up, 7, True)
    (want,) = choose_mlp(padded_hidden.reshape(-1, 6), padded.vote_rows, padded.sequence_matrix(torch.float64),
                         *gate, *up, 7, True)
    assert torch.equal(got, want)
    # Without position ids the row is one sequence: one mean of every context token.
    pooled = token_split(packed_labels, packed_labels.shape, torch.device("cpu"))
    assert pooled.sequences == 1 and pooled.sequence_matrix(torch.float64).shape == (12, 1)


def test_position_ids_of_padded_batches_change_no_mean():
    """Padded rows with position ids (a collator's right padding at position 0, Hugging Face's left
    padding at 1): a pad token starts no sequence, and a row's left padding, which the row's first
    real token (position 0) ends, is a sequence that never votes: a zero mean, which scores no
    channel. Every real sequence keeps its mean."""
    gen = torch.Generator().manual_seed(3)
    labels = _labels([[-100, -100, 5, 6, -100, -100], [-100, -100, -100, -100, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 0], [1, 1, 0, 1, 2, 3]])
    hidden = torch.randn(12, 4, dtype=torch.float64, generator=gen)
    rows = token_split(labels, labels.shape, torch.device("cpu"), attention_mask=mask)
    split = token_split(labels, labels.shape, torch.device("cpu"), attention_mask=mask, position_ids=positions)
    assert rows.sequences == 2 and split.sequences == 3
    means = sequence_means(hidden, split.sequence_matrix(torch.float64))
    real = means[means.abs().sum(1) > 0]
    torch.testing.assert_close(real, sequence_means(hidden, rows.sequence_matrix(torch.float64)))
