"""Padding is neither context nor output: it never votes in the channel choice and never
changes the result (the same real tokens give the same channels, loss and gradients)."""

import copy

import pytest
import torch
from helpers import assert_same_grads, tiny_lora_model, train_step

import sparse_unsloth as su
from sparse_unsloth.patch.state import token_split

CONFIG = su.SparseConfig(mlp={0: 0.6, 2: 0.8}, self_attn={1: 0.5, 2: 0.75}, estimator_rank=3)
PAD = 0


def _padded(rows, length):
    """Right-padded ids, labels (prompt masked: 4 tokens) and attention mask."""
    ids = torch.full((len(rows), length), PAD)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        labels[i, 4:len(row)] = row[4:]
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("ffn_seq_average", [True, False])
def test_extra_padding_changes_nothing(ffn_seq_average):
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 101, (n,), generator=gen) for n in (11, 8, 6)]
    config = su.SparseConfig(**{**CONFIG.__dict__, "ffn_seq_average": ffn_seq_average})
    model = su.sparsify(tiny_lora_model("llama"), config, progress=False)
    su.sparse_state(model).callback_attached = True
    twin = copy.deepcopy(model)
    tight, loose = _padded(rows, 11), _padded(rows, 15)               # 4 more pad tokens a row
    loss, grads = train_step(model, **tight)
    loose_loss, loose_grads = train_step(twin, **loose)
    # Hugging Face's loss runs in float32, so equal to float32 rounding
    torch.testing.assert_close(loss, loose_loss, rtol=1e-6, atol=1e-6)
    assert_same_grads(grads, loose_grads, rtol=1e-5, atol=1e-7)
    choices = su.sparse_state(model).current.choices
    loose_choices = su.sparse_state(twin).current.choices
    assert sorted(choices) == sorted(loose_choices) and len(choices) == 4
    for key, choice in choices.items():
        assert all(torch.equal(a, b) for a, b in zip(vars(choice).values(), vars(loose_choices[key]).values())), key


def test_split_of_a_padded_batch():
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100], [-100, -100, -100, 7, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])        # right- and left-padded
    split = token_split(labels, labels.shape, torch.device("cpu"), attention_mask=mask)
    assert split.dense_idx.tolist() == [1, 2, 3, 8, 9]
    assert split.sparse_idx.tolist() == [0, 10, 11]                     # real context tokens only
    assert split.num_tokens == 8
    with pytest.raises(ValueError, match="attention_mask of shape"):
        token_split(labels, labels.shape, torch.device("cpu"), attention_mask=mask[:, :4])


def test_a_mask_that_is_not_batch_by_seq_is_said():
    model = su.sparsify(tiny_lora_model("llama"), CONFIG, progress=False)
    su.sparse_state(model).callback_attached = True
    ids = torch.randint(1, 101, (2, 7))
    model.train()
    with pytest.warns(UserWarning, match="pad tokens vote in the channel choice"):
        su.sparse_state(model).begin_batch(ids, ids.shape, ids.device, True, torch.ones(2, 1, 7, 7))


def test_the_model_reads_a_padding_free_batchs_position_ids():
    """TRL's padding-free batches (Unsloth turns them on) pack the rows into one, with position ids
    that start again at each row: the split the model makes tells the packed sequences apart (the
    FFN estimator averages each one; test_tokens checks those means equal a padded batch's)."""
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 101, (n,), generator=gen) for n in (11, 8, 6)]
    padded = _padded(rows, 11)
    packed = {"input_ids": torch.cat(rows).unsqueeze(0),
              "labels": torch.cat([padded["labels"][i, :len(r)] for i, r in enumerate(rows)]).unsqueeze(0),
              "position_ids": torch.cat([torch.arange(len(r)) for r in rows]).unsqueeze(0)}
    model = su.sparsify(tiny_lora_model("llama"), CONFIG, progress=False)
    state = su.sparse_state(model)
    state.callback_attached = True
    model.train()
    with torch.no_grad():
        model(**packed)
    split = state.current.split
    assert split.sequences == 3 and split.sequence_ids.tolist() == [0] * 11 + [1] * 8 + [2] * 6
    assert split.sequence_matrix(torch.float64).shape == (25, 3)
    assert (0, "mlp") in state.current.choices                  # it ran sparse
