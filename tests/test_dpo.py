"""DPO: lorakit's loss, rewards and LoRA gradients against TRL's DPOTrainer (the oracle), and the reference."""

from __future__ import annotations

import json
import math
import warnings

import peft
import pytest
import torch
import trl
from tiny import make_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.errors import ConfigError
from lorakit.logprobs import completion_logps, token_logprobs
from lorakit.padding_free import enable_padding_free
from lorakit.pairs import collate_pairs, load_pairs, pack_pairs
from lorakit.preference import collate_for, dpo_loss, pair_logps, pair_metrics, reference_mode, shares_prompts
from lorakit.train.dpo import DpoObjective

ROWS = [
    {
        "prompt": [{"role": "user", "content": "say abc"}],
        "chosen": [{"role": "assistant", "content": "abc abc"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    },
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "name a colour"}],
        "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "I would rather not say"}],
    },
    {
        "prompt": [{"role": "user", "content": "count to three"}],
        "chosen": [{"role": "assistant", "content": "1 2 3"}],
        "rejected": [{"role": "assistant", "content": "one, two"}],
    },
]
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
DTYPE = torch.float32  # TRL's fused head computes log-probs in fp32 whatever the model dtype
# TRL's layout (2B padded rows) and lorakit's packed one (each prompt once, pairs back to back in one row)
LAYOUTS = {"padded": collate_pairs, "packed": pack_pairs}
LOSSES = [("sigmoid", 0.1, 0.0), ("hinge", 0.5, 0.0), ("ipo", 0.2, 0.0), ("robust", 0.1, 0.2)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    model_dir = make_tiny_model_dir(root / "model", hidden=32)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return model_dir, data, root


def _perturb(model: torch.nn.Module, adapter: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}." in name and "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _trl_trainer(model_dir, data, out, start_adapter=None, **dpo_args):
    """TRL's DPOTrainer on a PEFT model: a fresh LoRA (reference = base) or a loaded adapter (reference = its copy)."""
    from datasets import Dataset

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = trl.DPOConfig(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        per_device_train_batch_size=len(ROWS),
        **dpo_args,
    )
    rows = Dataset.from_list([json.loads(line) for line in data.read_text().splitlines()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if start_adapter is None:
            trainer = trl.DPOTrainer(
                model=base, args=args, train_dataset=rows, processing_class=tok, peft_config=peft.LoraConfig(**LORA)
            )
        else:
            model = peft.PeftModel.from_pretrained(base, str(start_adapter), is_trainable=True)
            trainer = trl.DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
    return trainer, tok


def _trl_step(trainer, loss_type, beta, eps):
    """Loss, metrics and grads of one DPO step on the whole data set, as TRL computes them."""
    trainer.loss_types, trainer.loss_weights, trainer.beta, trainer.label_smoothing = [loss_type], [1.0], beta, eps
    trainer._metrics["train"].clear()
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    loss = trainer._compute_loss(model, batch, False)
    loss.backward()
    grads = {n.replace("base_model.model.", ""): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads


def _lorakit_step(model, batch, loss_type, beta, eps, reference=None):
    model.train()
    model.zero_grad(set_to_none=True)
    with reference_mode(model, reference):
        ref_c, ref_r, _, _ = pair_logps(model, batch)
    c, r, nc, nr = pair_logps(model, batch)
    terms = dpo_loss(
        c, r, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=eps, chosen_tokens=nc, rejected_tokens=nr
    )
    loss = terms.losses.mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: v / len(c) for k, v in pair_metrics(terms, c, r).items()}
    return loss.item(), metrics, grads


def _check_equal(ours, theirs, rel=1e-5, grad_atol=1e-6):
    loss, metrics, grads = ours
    t_loss, t_metrics, t_grads = theirs
    assert loss == pytest.approx(t_loss, rel=rel, abs=1e-6)
    # Rewards are β times a difference of two fp32 sums of ~50 log-probs: equal to ~1e-6 absolute.
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert metrics[name] == pytest.approx(t_metrics[name], rel=1e-5, abs=1e-5), name
    assert set(grads) == set(t_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, t_grads[name], rtol=1e-4, atol=grad_atol, msg=lambda m, name=name: f"{name}: {m}")


def test_tokenization_matches_trl(tiny, tmp_path):
    model_dir, data, _ = tiny
    trainer, tok = _trl_trainer(model_dir, data, tmp_path)
    pairs, stats = load_pairs(data, tok, max_seq_len=1024)
    theirs = trainer.train_dataset
    assert stats.rows == len(theirs) == len(ROWS)
    for ours, t in zip(pairs, theirs):
        assert (ours["prompt_ids"], ours["chosen_ids"], ours["rejected_ids"]) == (
            t["prompt_ids"],
            t["chosen_ids"],
            t["rejected_ids"],
        )
    ours_batch = collate_pairs(pairs, tok.pad_token_id)
    t_batch = trainer.data_collator([theirs[i] for i in range(len(theirs))])
    assert torch.equal(ours_batch["input_ids"], t_batch["input_ids"])
    assert torch.equal(ours_batch["labels"] != -100, t_batch["completion_mask"].bool())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss_type,beta,eps", LOSSES)
def test_fresh_lora_matches_trl(tiny, tmp_path, loss_type, beta, eps, layout):
    """No starting adapter: the reference is the base (adapters disabled); loss, metrics and grads equal TRL's."""
    model_dir, data, _ = tiny
    trainer, tok = _trl_trainer(model_dir, data, tmp_path)
    _perturb(trainer.model, "default", seed=1)  # B = 0 would make policy == reference
    trainer.model.save_pretrained(tmp_path / "adapter")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    lorakit.load_adapter(model, tmp_path / "adapter", is_trainable=True)
    pairs, _ = load_pairs(data, tok)
    ours = _lorakit_step(model, LAYOUTS[layout](pairs, tok.pad_token_id), loss_type, beta, eps)
    _check_equal(ours, _trl_step(trainer, loss_type, beta, eps))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_from_adapter_matches_trl(tiny, tmp_path, layout):
    """Starting from an adapter: the reference is a frozen copy of it; after the policy moves, TRL agrees."""
    model_dir, data, _ = tiny
    start = tmp_path / "start"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    sft = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **LORA))
    sft.save_pretrained(start)
    trainer, tok = _trl_trainer(model_dir, data, tmp_path / "trl", start_adapter=start)
    _perturb(trainer.model, "default", seed=2)
    trainer.model.save_pretrained(tmp_path / "moved", selected_adapters=["default"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    lorakit.load_adapter(model, tmp_path / "moved", is_trainable=True)
    lorakit.load_adapter(model, start, adapter_name="reference")
    pairs, _ = load_pairs(data, tok)
    batch = LAYOUTS[layout](pairs, tok.pad_token_id)
    for loss_type, beta, eps in LOSSES[:2]:
        ours = _lorakit_step(model, batch, loss_type, beta, eps, reference="reference")
        # A trained adapter moves log-probs further from the reference: fp32 sums agree to ~1e-5 relative, and
        # a gradient element near 0 to a few 1e-6 (the layouts agree to 1e-10 in float64: the packed-pairs test).
        _check_equal(ours, _trl_step(trainer, loss_type, beta, eps), rel=5e-5, grad_atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cdpo_matches_trl_for_one_pair(tiny, tmp_path, layout):
    """sigmoid with label smoothing is cDPO; TRL 1.16 keeps that formula as 'aot', equal for a single pair."""
    model_dir, data, root = tiny
    one = root / "one.jsonl"
    one.write_text(json.dumps(ROWS[1]) + "\n")
    trainer, tok = _trl_trainer(model_dir, one, tmp_path)
    _perturb(trainer.model, "default", seed=3)
    trainer.model.save_pretrained(tmp_path / "adapter")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    lorakit.load_adapter(model, tmp_path / "adapter", is_trainable=True)
    pairs, _ = load_pairs(one, tok)
    ours = _lorakit_step(model, LAYOUTS[layout](pairs, tok.pad_token_id), "sigmoid", 0.3, 0.25)
    trainer.args.per_device_train_batch_size = 1
    _check_equal(ours, _trl_step(trainer, "aot", 0.3, 0.25))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_zero_policy_is_reference(tiny, layout):
    """A fresh LoRA (B = 0): rewards exactly 0 and the sigmoid loss exactly ln 2."""
    model_dir, data, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    lorakit.inject(model, lorakit.LoraConfig(**LORA))
    pairs, _ = load_pairs(data, tok)
    batch = LAYOUTS[layout](pairs, tok.pad_token_id)
    with reference_mode(model):
        ref_c, ref_r, _, _ = pair_logps(model, batch)
    c, r, _, _ = pair_logps(model, batch)
    terms = dpo_loss(c, r, ref_c, ref_r, beta=0.1)
    assert torch.equal(terms.chosen_rewards, torch.zeros(len(pairs)))
    assert torch.equal(terms.rejected_rewards, torch.zeros(len(pairs)))
    assert torch.equal(terms.losses, torch.full((len(pairs),), math.log(2)))  # ln 2 in fp32, exactly


def test_reference_is_the_starting_adapter_and_no_second_model(tiny, tmp_path):
    """From an SFT adapter: reference log-probs equal the SFT adapter's; the reference adds no base parameters."""
    model_dir, data, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    sft = lorakit.inject(
        AutoModelForCausalLM.from_pretrained(model_dir), lorakit.LoraConfig(init_lora_weights=False, **LORA)
    )
    lorakit.save_adapter(sft, tmp_path / "sft")
    pairs, _ = load_pairs(data, tok)
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        sft_c, sft_r, _, _ = pair_logps(sft.eval(), batch)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    base_params = sum(p.numel() for p in model.parameters())
    n_modules = sum(1 for _ in model.modules())
    lorakit.load_adapter(model, tmp_path / "sft", is_trainable=True)
    lorakit.load_adapter(model, tmp_path / "sft", adapter_name="reference")
    _perturb(model, "default", seed=4)  # the policy moves; the reference must not
    with reference_mode(model, "reference"):
        ref_c, ref_r, _, _ = pair_logps(model, batch)
    torch.testing.assert_close(ref_c, sft_c, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_r, sft_r, rtol=0, atol=1e-5)
    pol_c, _, _, _ = pair_logps(model, batch)
    assert not torch.allclose(pol_c, sft_c)
    # One base: every parameter beyond the base's is a LoRA matrix of one of the two adapters.
    extra = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters()) == base_params + extra
    lora_per_adapter = sum(p.numel() for n, p in model.named_parameters() if ".default." in n)
    assert extra == 2 * lora_per_adapter
    assert sum(1 for m in model.modules() if isinstance(m, type(model.model))) == 1
    assert sum(1 for _ in model.modules()) > n_modules  # wrappers added, no second decoder stack
    # The reference context gives everything back: active adapter and trainable flags.
    assert lorakit.active_adapters(model) == ["default"]
    assert all(p.requires_grad == (".default." in n) for n, p in model.named_parameters())


def test_token_logprobs_match_float64_autograd():
    """The chunked log-prob gather equals log_softmax of the full logits, values and hidden-state gradients."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g, dtype=torch.float64)
    ours = token_logprobs(hidden, weight, targets, chunk_size=8)
    (ours * upstream).sum().backward()
    grad_ours, hidden.grad = hidden.grad.clone(), None
    ref = (hidden @ weight.t()).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, hidden.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda h: token_logprobs(h, weight, targets, chunk_size=5), (hidden.detach().requires_grad_(),)
    )


def test_completion_logps_equal_full_logits(tiny):
    """The model-level gather equals the log-probs of the full logits, per row, with padding and prompt masked."""
    model_dir, data, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    pairs, _ = load_pairs(data, tok)
    batch = collate_pairs(pairs, tok.pad_token_id, pad_to_multiple_of=8)
    logps, counts = completion_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    full = logits.log_softmax(-1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(logps, (full * mask).sum(1), rtol=1e-10, atol=1e-10)
    assert counts.tolist() == mask.sum(1).tolist()


def _logps_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    c, r, nc, nr = pair_logps(model, batch)
    (c.sum() - 2 * r.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return (c.detach(), r.detach(), nc, nr), grads


@pytest.mark.parametrize("attn", ["sdpa", "eager", "padding_free"])
def test_packed_pairs_score_what_padded_rows_score(tiny, attn):
    """pack_pairs (each prompt once, pairs packed, one row or several) gives the padded layout's log-probs,
    token counts and LoRA gradients in float64; an empty prompt leaves the first answer token unscored in both.
    A padding-free model (what `lorakit train` makes on a CPU) still shares prompts: its attention is SDPA there."""
    model_dir, data, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="sdpa" if attn == "padding_free" else attn
    )
    if attn == "padding_free":
        enable_padding_free(model)
        assert shares_prompts(model)
    lorakit.inject(model, lorakit.LoraConfig(init_lora_weights=False, **LORA))
    pairs, _ = load_pairs(data, tok)
    pairs.append({"prompt_ids": [], "chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]})  # no prompt: by hand
    (want, want_grads) = _logps_and_grads(model, collate_pairs(pairs, tok.pad_token_id))
    for row_tokens, multiple in (
        (512, None),
        (1, 8),
        (60, 16),
    ):  # one row; rows no longer than the longest pair; rows of 60
        batch = pack_pairs(pairs, tok.pad_token_id, multiple, row_tokens=row_tokens)
        assert (batch["input_ids"].shape[0] == 1) == (row_tokens == 512)
        # each prompt once: the packed batch holds P + C + R tokens a pair, not 2P + C + R
        real = int((batch["pair_ids"] >= 0).sum())
        assert real == sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
        got, grads = _logps_and_grads(model, batch)
        # float64 is not float64 all the way: transformers' eager attention takes its softmax in fp32, and the
        # masked SDPA backward differs from the is_causal one by up to ~1e-5 relative; a wrong mask (an answer
        # seeing the other) moves log-probs by whole units.
        for g, w in zip(got[:2], want[:2]):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8)
        assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
        assert got[2][-1] == 2 and got[3][-1] == 1  # the prompt-less pair: first answer tokens not scored
        for name, g in grads.items():
            torch.testing.assert_close(
                g,
                want_grads[name],
                rtol=1e-4,
                atol=1e-4 * float(want_grads[name].abs().max()),
                msg=lambda m, name=name: f"{name}: {m}",
            )


def test_packed_layout_only_where_the_model_takes_its_mask(tiny, tmp_path):
    """A model with a sliding window does not share prompts: collate_for and the objective fall back to
    padded rows, and pair_logps refuses a packed batch for it instead of scoring it wrong."""
    model_dir, data, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pairs, _ = load_pairs(data, tok)
    objective = DpoObjective(tok.pad_token_id, 0.1, "sigmoid", 0.0, None)
    prepare = dict(
        run_dir=tmp_path, precision="fp32", batch_size=2, to_device=lambda b: b, autocast=None, write=False, say=print
    )
    assert shares_prompts(model) and "score_index" in collate_for(model, pairs, tok.pad_token_id)
    objective.prepare(model, {"train": pairs}, **prepare)
    assert objective.packed and "score_index" in objective.collate(pairs)
    model.config.sliding_window = 8
    assert not shares_prompts(model)
    assert "labels" in collate_for(model, pairs, tok.pad_token_id)
    with pytest.raises(ConfigError, match="collate_pairs"):
        pair_logps(model, pack_pairs(pairs, tok.pad_token_id))
    objective.prepare(model, {"train": pairs}, **prepare)
    assert not objective.packed and "labels" in objective.collate(pairs)
