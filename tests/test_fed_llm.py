"""Federated DP instruction tuning of causal LMs (recipes/fed_llm.py): exact per-sample gradients on tiny Llama-,
Qwen2- and GPT-2-style models with prompt masking and left / right padding, the per-example sensitivity bound
through the public trainer, gradient checkpointing, and the recipe end to end (adapter loads and generates in a
fresh process).

References are independent of the code under test: each example alone (no padding), plain autograd; the update
bound is C / B from the definition of the clipped mean. Tolerance: |got - ref| <= 1e-6 + 1e-5 * |ref| (CPU fp32).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from datasets import Dataset
from fed_helpers import adapter_state, toy_args
from peft import get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import peft_lalora  # noqa: F401  (registers LALORA with peft)
from peft_lalora import ConfigError, FederatedDPArguments, FederatedDPTrainer, LALoraConfig, UnsupportedModelError
from peft_lalora.privacy.grad_sample import select_backend
from peft_lalora.privacy.losses import per_example_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))  # llm_data imports its sibling `data`
_spec = importlib.util.spec_from_file_location("llm_data", os.path.join(ROOT, "recipes", "llm_data.py"))
llm_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm_data)

ATOL, RTOL = 1e-6, 1e-5
VOCAB = 64
ATTENTION = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
}


def tiny_causal_lm(name: str, seed: int = 0, positions: int = 64):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=positions,
    )
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw)).eval()
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()


def peft_causal_lm(name: str, method: str = "dplora", seed: int = 0, randomize: bool = True, **kw):
    config = LALoraConfig.for_method(method, r=2, lora_alpha=4, target_modules=ATTENTION[name], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_causal_lm(name, seed, **kw), config)
    if randomize:  # non-zero B so that A's gradient is non-zero too
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def features(n: int = 5, seed: int = 0) -> list[dict]:
    """Tokenised instruction examples: prompts of 2-5 tokens (masked), responses of 1-4 tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, VOCAB, (2 + i % 4,), generator=g).tolist()
        response = torch.randint(3, VOCAB, (1 + (i * 3) % 4,), generator=g).tolist() + [2]
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


def reference(model, rows: list[dict], params: dict) -> dict:
    """Each example alone, unpadded, with its own positions 0..T-1; plain autograd."""
    grads = {n: [] for n in params}
    for row in rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        loss = per_example_loss(model(input_ids=ids), {"labels": labels})
        for n, g in zip(params, torch.autograd.grad(loss.sum(), list(params.values()))):
            grads[n].append(g)
    return {n: torch.stack(v) for n, v in grads.items()}


# ----- exact per-sample gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_per_sample_gradients_exact_with_prompt_masking_and_padding(name, padding_side):
    # Prepare: A and B train together; a batch padded by the recipe's collator (positions from the first real token)
    model = peft_causal_lm(name)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = features()
    batch = llm_data.CausalLMCollator(0, padding_side)(rows)
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).sum() > (
        batch["attention_mask"] == 0
    ).sum()
    # Execute
    with select_backend(model) as backend:  # "auto"
        got, _ = backend.compute(batch, params)
        assert backend.name == "hooks"
    # Assert
    ref = reference(model, rows, params)
    assert {n for n in params if ".lora_A." in n} and {n for n in params if ".lora_B." in n}
    for n in params:
        torch.testing.assert_close(got[n], ref[n], atol=ATOL, rtol=RTOL, msg=lambda m, n=n: f"{n}: {m}")
    assert max(float(ref[n].abs().max()) for n in params) > 1e-3


def test_collator_pads_left_or_right_and_masks_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = llm_data.CausalLMCollator(0, "right")(rows)
    left = llm_data.CausalLMCollator(0, "left")(rows)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]] and left["input_ids"].tolist() == [
        [5, 6, 7],
        [0, 0, 8],
    ]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]] and right["position_ids"].tolist() == [
        [0, 1, 2],
        [0, 0, 0],
    ]


def test_tokenisation_masks_the_prompt_and_ends_the_response_with_eos(tmp_path):
    # Prepare: a JSONL file with and without an input, and the offline byte-level tokenizer
    path = tmp_path / "data.jsonl"
    records = [
        {"instruction": "Say hi.", "input": "", "output": "hi", "user": "a"},
        {"instruction": "Repeat.", "input": "abc", "output": "abc abc", "user": "b"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    tokenizer = llm_data.train_byte_bpe_tokenizer(["Say hi. hi Repeat. abc abc"] * 10, vocab_size=300)
    # Execute
    dataset = llm_data.load_instructions(str(path))
    tokens = llm_data.tokenize_instructions(dataset, tokenizer, max_seq_length=512, keep=("user",))
    short = llm_data.tokenize_instructions(dataset, tokenizer, max_seq_length=12)
    # Assert: labels are -100 exactly over the prompt, then the response and EOS
    assert set(tokens.column_names) == {"user", "input_ids", "labels"}
    for record, row in zip(records, tokens):
        prompt = tokenizer(llm_data.format_prompt(record), add_special_tokens=False)["input_ids"]
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert row["input_ids"] == prompt + response
        assert row["labels"] == [-100] * len(prompt) + response
    assert "### Input:\nabc" in llm_data.format_prompt(records[1]) and "### Input" not in llm_data.format_prompt(
        records[0]
    )
    # truncated: the prompt is cut from its start, the response keeps its tokens
    assert all(len(r["input_ids"]) <= 12 and r["labels"][-1] == tokenizer.eos_token_id for r in short)


# ----- the sensitivity bound through the public trainer ----------------------------------------------------------
def _update(tmp_path, name: str, rows: list[dict], clip: float) -> dict:
    """The global adapter's change after one round, one client holding `rows`, q = 1, one step, no noise, SGD lr 1."""
    model = peft_causal_lm(name, positions=1100)
    before = adapter_state(model)
    args = toy_args(
        tmp_path,
        num_clients=1,
        clients_per_round=1,
        num_rounds=1,
        local_steps=1,
        per_device_train_batch_size=len(rows),
        learning_rate=1.0,
        noise_multiplier=0.0,
        per_sample_max_grad_norm=clip,
        save_strategy="no",
    )
    dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FederatedDPTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=llm_data.CausalLMCollator(0, "right")
        ).train()
    after = adapter_state(model)
    return {n: after[n] - before[n] for n in before}


def _distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in a)))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_one_changed_example_moves_the_update_by_at_most_c_over_b_whatever_its_length(tmp_path, name):
    # Prepare: 4 examples; the 4th is absent (no counted token: zero gradient), or has 3, or 1,000 response tokens
    rows = features(4)
    g = torch.Generator().manual_seed(9)
    long_response = torch.randint(3, VOCAB, (1000,), generator=g).tolist()
    absent = {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}
    short = {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, 8, 9, 10]}
    long = {"input_ids": [5, 6, 7] + long_response, "labels": [-100, -100, -100] + long_response}
    clip, batch = 1e-3, 4  # C well below every per-example gradient norm: each example is clipped to C
    # Execute
    updates = {
        k: _update(tmp_path / k, name, rows[:3] + [row], clip)
        for k, row in (("absent", absent), ("short", short), ("long", long))
    }
    # Assert: adding one example moves the update by at most C / B (SGD, lr 1), changing one by at most 2 C / B,
    # and the 1,000-token example weighs no more than the 3-token one (both exactly C / B once clipped)
    moved_long, moved_short = (
        _distance(updates["long"], updates["absent"]),
        _distance(updates["short"], updates["absent"]),
    )
    assert moved_long <= clip / batch * (1 + 1e-4) and moved_short <= clip / batch * (1 + 1e-4)
    assert moved_long == pytest.approx(clip / batch, rel=1e-3) and moved_long <= moved_short * (1 + 1e-3)
    assert _distance(updates["long"], updates["short"]) <= 2 * clip / batch * (1 + 1e-4)


# ----- gradient checkpointing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_non_reentrant_gradient_checkpointing_gives_exact_per_sample_gradients(name):
    model = peft_causal_lm(name)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = features()
    ref = reference(model, rows, params)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers only checkpoints in training mode (no dropout in these configs)
    with select_backend(model, "hooks") as backend:
        got, _ = backend.compute(llm_data.CausalLMCollator(0, "left")(rows), params)
    for n in params:
        torch.testing.assert_close(got[n], ref[n], atol=ATOL, rtol=RTOL)
    with pytest.raises(
        UnsupportedModelError, match=r"gradient checkpointing, which `backend='func'`.*backend='hooks'"
    ):
        select_backend(model, "func").compute(llm_data.CausalLMCollator(0, "left")(rows), params)


def test_reentrant_gradient_checkpointing_is_refused_not_run():
    # Reentrant checkpointing runs its own inner backward: the per-sample gradients would be zero, so it is refused
    model = peft_causal_lm("llama")
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(UnsupportedModelError, match=r"reentrant gradient checkpointing.*'use_reentrant': False"):
        select_backend(model, "hooks").compute(llm_data.CausalLMCollator(0, "right")(features()), params)
    assert all(p.grad is None for p in params.values())


def test_gradient_checkpointing_argument_is_refused_with_the_way_to_enable_it(tmp_path):
    with pytest.raises(ConfigError, match=r"`gradient_checkpointing`=True is not honoured.*use_reentrant': False"):
        FederatedDPArguments(output_dir=str(tmp_path), noise_multiplier=1.0, gradient_checkpointing=True)


# ----- the recipe -----------------------------------------------------------------------------------------------
def _launch(flags: list, tmp_path) -> str:
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launcher = (
        [accelerate, "launch"] if os.path.exists(accelerate) else [sys.executable, "-m", "accelerate.commands.launch"]
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=ROOT,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HOME=str(tmp_path / "hf_home"),
    )
    cmd = (
        launcher
        + [
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            os.path.join(ROOT, "recipes", "fed_llm.py"),
        ]
        + flags
    )
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"fed_llm failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_fed_llm", os.path.join(ROOT, "recipes", "fed_llm.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


SMALL_FED = [
    "--num_rounds",
    "2",
    "--local_steps",
    "2",
    "--num_clients",
    "4",
    "--clients_per_round",
    "2",
    "--per_device_train_batch_size",
    "8",
    "--eval_rounds",
    "0",
    "--target_epsilon",
    "8",
]
LOAD_AND_GENERATE = """
import json, sys, torch
import peft_lalora
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
base_id = json.load(open(folder + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
ids = tok("### Instruction:\\nIs this movie review fresh or rotten?", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"new_tokens": out.shape[1] - ids["input_ids"].shape[1], "type": type(model).__name__}))
"""


@pytest.mark.processes
def test_fed_llm_offline_default_runs_and_its_adapter_generates_in_a_fresh_process(tmp_path, capsys):
    # Prepare: the offline default (random Llama from a config, Rotten Tomatoes as instructions), small, in process
    # (the slow test below runs the recipe through `accelerate launch`)
    out_dir = tmp_path / "out"
    flags = [
        "--max_train_samples",
        "300",
        "--max_eval_samples",
        "32",
        "--eval_generate",
        "8",
        "--max_seq_length",
        "80",
        "--output_dir",
        str(out_dir),
        "--noise_seed",
        "0",
    ] + SMALL_FED
    fed_llm = _recipe()
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fed_llm.main(flags)
    stdout = capsys.readouterr().out
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, str(out_dir)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    # Assert: artifacts, a finite epsilon within target, the LoRA targets, and generation after a fresh load
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"new_tokens": 5, "type": "PeftModelForCausalLM"}
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LALORA" and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    report = json.loads((out_dir / "privacy_report.json").read_text())
    assert 0 < report["epsilon"] <= 8.0 + 1e-6 and f"epsilon: {report['epsilon']:.4f}" in stdout
    assert "exact_match: " in stdout and "loss: " in stdout and '"client_split": "column"' in stdout
    card = (out_dir / "README.md").read_text()
    assert "Causal-LM (text-generation) LoRA adapter" in card and "pipeline_tag: text-generation" in card
    assert "## Training data" in card and '`{"instruction", "input", "output"}`' in card


def test_fed_llm_refuses_a_folder_holding_another_run_before_touching_its_base(tmp_path):
    # Prepare: an earlier run's folder (its checkpoint folder and the offline base its adapter names)
    out_dir = tmp_path / "out"
    (out_dir / "federated_state").mkdir(parents=True)
    (out_dir / "base_model").mkdir()
    (out_dir / "base_model" / "config.json").write_text('{"the": "earlier run\'s base"}')
    flags = ["--max_train_samples", "64", "--max_eval_samples", "8", "--output_dir", str(out_dir)] + SMALL_FED
    # Execute / Assert: refused as train() refuses it, naming the flags, and the earlier base is untouched
    with pytest.raises(ConfigError, match="holds another run.*--resume_from_checkpoint True"):
        _recipe().main(flags)
    assert (out_dir / "base_model" / "config.json").read_text() == '{"the": "earlier run\'s base"}'
    assert sorted(os.listdir(out_dir / "base_model")) == ["config.json"]


@pytest.mark.slow
def test_fed_llm_fine_tunes_a_local_gpt2_on_a_jsonl_file_with_left_padding_and_mlp_adapters(tmp_path):
    # Prepare: a tiny GPT-2 checkpoint with the offline tokenizer, and 60 JSONL records from 4 users
    tokenizer = llm_data.train_byte_bpe_tokenizer(["count to three: one two three"] * 20, vocab_size=300)
    ckpt = tmp_path / "tiny_gpt2"
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=128,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    ).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    path = tmp_path / "train.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"instruction": "count", "input": str(i), "output": "one two three", "user": f"u{i % 4}"})
            for i in range(60)
        )
    )
    out_dir = tmp_path / "out"
    flags = [
        "--model_name_or_path",
        str(ckpt),
        "--dataset",
        str(path),
        "--client_split",
        "column",
        "--client_column",
        "user",
        "--eval_size",
        "10",
        "--padding_side",
        "left",
        "--lora_on_mlp",
        "True",
        "--max_seq_length",
        "64",
        "--output_dir",
        str(out_dir),
    ] + SMALL_FED
    flags[flags.index("--per_device_train_batch_size") + 1] = "4"
    # Execute
    stdout = _launch(flags, tmp_path)
    # Assert
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]
    assert "exact_match: " in stdout


def test_fed_llm_arguments_defaults_and_checks():
    fed_llm = _recipe()
    model_args, data_args, args = fed_llm.parse_args([])
    assert model_args.model_name_or_path is None and data_args.dataset is None and args.target_epsilon == 8.0
    assert fed_llm.resolve_client_split(data_args, args) == "column" and data_args.client_column == "movie"
    assert fed_llm.resolve_targets(model_args, "llama") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    model_args.lora_on_mlp = True
    assert fed_llm.resolve_targets(model_args, "gpt2") == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    # the non-private baseline gets no default epsilon (DP settings with dp=False are refused)
    _, _, args = fed_llm.parse_args(["--dp", "False"])
    assert not args.dp and args.target_epsilon is None
    _, data_args, args = fed_llm.parse_args(["--dataset", "x.jsonl", "--client_split", "column"])
    with pytest.raises(ValueError, match="`client_split` 'column' needs `client_column`"):
        fed_llm.resolve_client_split(data_args, args)
    _, data_args, args = fed_llm.parse_args(["--dataset", "x.jsonl", "--client_split", "dirichlet"])
    with pytest.raises(ValueError, match="needs `label_column` naming a category column"):
        fed_llm.resolve_client_split(data_args, args)
