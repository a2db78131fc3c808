"""A client shard collated once gives every batch bit for bit as collating that batch does (reference: the
collator applied to the examples read one at a time), for transformers' default collator and for
`DataCollatorWithPadding`; collators whose batches it cannot derive are collated batch by batch; and a federated
run trains the same adapters either way."""

import pytest
import torch
from datasets import Dataset
from fed_helpers import adapter_state, make_trainer, toy_args, toy_dataset, toy_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast, default_data_collator

from peft_lalora import FederatedDPTrainer
from peft_lalora.federated import ClientShard
from peft_lalora.federated.client import CollatedRows

COLUMNS = {"input_ids", "attention_mask", "token_type_ids", "labels", "label"}


def word_tokenizer(padding_side="right"):
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(40)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
        pad_token="[PAD]",
        unk_token="[UNK]",
        padding_side=padding_side,
    )


def ragged_dataset(n=40, seed=0, label_key="labels"):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (n,), generator=g).tolist()
    ids = [torch.randint(2, 42, (k,), generator=g).tolist() for k in lengths]
    return Dataset.from_dict(
        {
            "input_ids": ids,
            "token_type_ids": [[i % 2] * len(x) for i, x in enumerate(ids)],
            label_key: [i % 3 for i in range(n)],
            "text": [f"row {i}" for i in range(n)],
        }
    )


def fixed_dataset(n=40, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(2, 42, (n, length), generator=g).tolist(),
            "attention_mask": [[1] * length] * n,
            "label": [i % 2 for i in range(n)],
        }
    )


def reference_batch(dataset, collate, indices, positions):
    """The collator on the examples read one at a time (empty batch: one example's keys and shapes, zero rows)."""
    rows = [{k: v for k, v in dataset[indices[p]].items() if k in COLUMNS} for p in (positions or [0])]
    out = collate(rows)
    if "label" in out:
        out["labels"] = out.pop("label")
    return {k: v if positions else v[:0] for k, v in out.items() if isinstance(v, torch.Tensor)}


def position_sets(size, seed=1, count=60):
    g = torch.Generator().manual_seed(seed)
    draws = [
        torch.nonzero(torch.rand(size, generator=g) < q).flatten().tolist()
        for q in (0.05, 0.2, 0.5, 0.9)
        for _ in range(count // 4)
    ]
    return draws + [[], [0], [size - 1], list(range(size))]


def assert_same_batch(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize(
    "make_data, make_collate",
    [
        (ragged_dataset, lambda: DataCollatorWithPadding(word_tokenizer())),
        (
            lambda: ragged_dataset(label_key="label"),
            lambda: DataCollatorWithPadding(word_tokenizer(), padding="longest"),
        ),
        (fixed_dataset, lambda: default_data_collator),
    ],
)
@pytest.mark.parametrize("chunk_rows", [4096, 7])
def test_collated_shard_batches_equal_collating_each_batch(make_data, make_collate, chunk_rows, monkeypatch):
    # Prepare: shards of every other row, of examples of several lengths (or one length for the default collator),
    # made directly and as a subset of the whole dataset's shard (as the trainer makes them)
    monkeypatch.setattr(CollatedRows, "CHUNK_ROWS", chunk_rows)  # 7: collated in pieces of several lengths
    dataset, collate = make_data(), make_collate()
    indices = list(range(1, len(dataset), 2))
    shards = [
        ClientShard(dataset, collate, COLUMNS, "cpu", indices),
        ClientShard(dataset, collate, COLUMNS, "cpu").subset(indices),
    ]
    assert CollatedRows.build(shards[0].dataset, collate) is not None  # the collated path is taken
    # Execute / Assert: every batch, including empty ones and the whole shard
    for shard in shards:
        for positions in position_sets(len(indices)):
            assert_same_batch(shard.batch(positions), reference_batch(dataset, collate, indices, positions))


@pytest.mark.parametrize(
    "make_collate",
    [
        lambda: DataCollatorWithPadding(word_tokenizer("left")),
        lambda: DataCollatorWithPadding(word_tokenizer(), pad_to_multiple_of=8),
        lambda: lambda features: DataCollatorWithPadding(word_tokenizer())(features),
    ],
)
def test_other_collators_collate_each_batch(make_collate):
    dataset, collate = ragged_dataset(), make_collate()
    indices = list(range(0, len(dataset), 3))
    shard = ClientShard(dataset, collate, COLUMNS, "cpu", indices)
    assert CollatedRows.build(shard.dataset, collate) is None
    for positions in position_sets(len(indices), count=12):
        assert_same_batch(shard.batch(positions), reference_batch(dataset, collate, indices, positions))


def test_training_with_the_collated_shards_gives_the_same_adapter(tmp_path):
    # Prepare: the same run (fixed noise), once with the Trainer's default collator (collated shards), once with a
    # wrapper that hides it (each batch collated)
    fast = make_trainer(tmp_path / "fast")
    slow = FederatedDPTrainer(
        model=toy_model(),
        args=toy_args(tmp_path / "slow"),
        train_dataset=toy_dataset(),
        data_collator=lambda features: default_data_collator(features),
    )
    assert fast.data_collator is default_data_collator
    # Execute
    fast.train()
    slow.train()
    # Assert: bit-identical adapters
    got, want = adapter_state(fast.model), adapter_state(slow.model)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
