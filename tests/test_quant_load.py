"""The streamed 4-bit load (lorakit.quant_load): the same model as transformers' mapped load, without the map.

Independent reference: transformers' own ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
over the memory-mapped safetensors file, then ``prepare_quantized`` (lorakit's 4-bit load before streaming).
Memory is checked on what the loader does, not on RSS: transformers' tensor materialization is observed
(weak references to every tensor read from the file, and /proc/self/maps at each read).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

sys.path.insert(0, str(Path(__file__).parent))
from test_quant import KINDS  # noqa: E402
from tiny import make_tiny_model_dir  # noqa: E402

import lorakit  # noqa: E402
from lorakit import models, quant_load, quant_model  # noqa: E402
from lorakit.errors import ModelLoadError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tied_sharded_dir(path: Path) -> Path:
    """A tiny Llama with tied embeddings (as the default model), saved in several safetensors shards."""
    from tiny import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="40KB")
    tok.save_pretrained(path)
    return path


def gpt2_dir(path: Path) -> Path:
    """A tiny GPT-2: Conv1D layers, learned positions, tied head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    GPT2LMHeadModel(GPT2Config(vocab_size=259, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qload")
    return {
        "single": make_tiny_model_dir(root / "single"),
        "sharded": tied_sharded_dir(root / "sharded"),
        "gpt2": gpt2_dir(root / "gpt2"),
    }


def mapped_reference(path, kind="nf4", dq=True):
    """lorakit's 4-bit load before streaming: transformers' mapped load, then prepare_quantized."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=cfg, dtype=torch.float32, device_map={"": "cpu"}, local_files_only=True
    )
    return quant_model.prepare_quantized(model, torch.float32).eval()


def ids(seed=0):
    return torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(seed))


def mapped_files(path: Path) -> set[Path]:
    """The safetensors files of ``path`` that this process maps now."""
    files = {p.resolve() for p in path.glob("*.safetensors")}
    rows = [line.split(maxsplit=5) for line in Path("/proc/self/maps").read_text().splitlines()]
    return files & {Path(r[5].strip()).resolve() for r in rows if len(r) == 6 and r[5].startswith("/")}


def assert_same_model(a, b):
    import bitsandbytes as bnb

    sa, sb = a.state_dict(), b.state_dict()  # Linear4bit's holds the packed codes and every quant-state tensor
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    pa, pb = dict(a.named_parameters(remove_duplicate=False)), dict(b.named_parameters(remove_duplicate=False))
    assert list(pa) == list(pb)
    for k in pa:
        assert type(pa[k]) is type(pb[k]) and pa[k].requires_grad == pb[k].requires_grad is False, k
        assert torch.equal(pa[k].data, pb[k].data), k
    ba, bb = dict(a.named_buffers(remove_duplicate=False)), dict(b.named_buffers(remove_duplicate=False))
    assert list(ba) == list(bb)  # non-persistent ones (rotary inv_freq) included
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k
    la = [(n, m) for n, m in a.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    lb = dict((n, m) for n, m in b.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    assert la and [n for n, _ in la] == list(lb)
    for n, m in la:
        qa, qb = m.weight.quant_state.as_dict(), lb[n].weight.quant_state.as_dict()
        assert list(qa) == list(qb), n
        for k in qa:
            same = torch.equal(qa[k], qb[k]) if isinstance(qa[k], torch.Tensor) else qa[k] == qb[k]
            assert same, (n, k)
        assert m.compute_dtype == lb[n].compute_dtype and m.weight.quant_type == lb[n].weight.quant_type
    emb_a, emb_b = a.get_input_embeddings().weight, b.get_input_embeddings().weight
    assert (a.lm_head.weight is emb_a) == (b.lm_head.weight is emb_b)
    assert a.config.to_dict() == b.config.to_dict()
    assert a.generation_config.to_dict() == b.generation_config.to_dict()
    assert a.training is b.training is False and a.is_loaded_in_4bit and b.is_loaded_in_4bit
    with torch.no_grad():
        assert torch.equal(a(ids()).logits, b(ids()).logits)


@pytest.mark.parametrize("layout", ["single", "sharded", "gpt2"])
@pytest.mark.parametrize("kind,dq", KINDS)
def test_streamed_load_equals_the_mapped_load_bit_for_bit(dirs, layout, kind, dq):
    path = dirs[layout]
    files = quant_load.safetensors_files(path)
    assert files == sorted(path.glob("*.safetensors")) and (len(files) > 1) == (layout == "sharded")
    streamed = quant_load.load_4bit(path, quantization=kind, double_quant=dq, compute_dtype="fp32")
    assert_same_model(streamed, mapped_reference(path, kind, dq))
    assert (streamed.lm_head.weight is streamed.get_input_embeddings().weight) == (layout != "single")
    if layout == "sharded":
        assert any("inv_freq" in k for k, _ in streamed.named_buffers())


def test_load_model_streams_and_says_nothing_else_changed(dirs):
    """models.load_model's 4-bit route is the streamed load, with the tokenizer."""
    model, tok = models.load_model(dirs["single"], quantization="nf4", compute_dtype="fp32")
    assert_same_model(model, quant_load.load_4bit(dirs["single"], compute_dtype="fp32"))
    assert tok.pad_token is not None


def test_streamed_load_trains_as_the_mapped_one(dirs):
    path = dirs["sharded"]
    grads = []
    for model in (quant_load.load_4bit(path, compute_dtype="fp32"), mapped_reference(path)):
        torch.manual_seed(0)
        lorakit.inject(
            model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        losses = []
        for _ in range(4):
            loss = model(ids(1), labels=ids(1)).loss
            opt.zero_grad()
            loss.backward()
            if not losses:
                grads.append([p.grad.clone() for p in params])
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(x, y) for x, y in zip(*grads))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_load_never_maps_the_file_and_holds_one_read_tensor_at_a_time(dirs, monkeypatch):
    """At every tensor transformers reads: the weights file is not mapped, and of the tensors read so far only the
    ones the model keeps (embeddings, norms) are alive: each weight is quantized and dropped before the next read,
    so one full-precision weight at a time. The mapped load breaks the first (the premise, checked last)."""
    import transformers.core_model_loading as cml
    from safetensors import safe_open
    from torch.multiprocessing.reductions import StorageWeakRef

    path = dirs["sharded"]
    read = cml._materialize_copy
    refs: list[StorageWeakRef] = []  # the storage of every tensor read (a Parameter made of it shares it)
    seen: list[tuple[set[Path], list[int]]] = []

    def observed(tensor, device=None, dtype=None):
        seen.append((mapped_files(path), [i for i, r in enumerate(refs) if not r.expired()]))
        out = read(tensor, device, dtype)
        refs.append(StorageWeakRef(out.untyped_storage()))
        return out

    monkeypatch.setattr(cml, "_materialize_copy", observed)
    model = quant_load.load_4bit(path, compute_dtype="fp32")
    gc.collect()
    kept = {i for i, r in enumerate(refs) if not r.expired()}
    files = quant_load.safetensors_files(path)
    assert len(refs) == sum(len(safe_open(str(f), "pt", backend="pread").keys()) for f in files)  # each read seen
    n_kept = sum(1 for n, p in model.named_parameters() if type(p).__name__ != "Params4bit")  # embeddings, norms
    assert len(kept) == n_kept and all(not mapped for mapped, _ in seen)
    assert all(set(alive) <= kept for _, alive in seen)  # each weight read is dropped before the next is
    assert mapped_files(path) == set()

    refs.clear()
    seen.clear()
    mapped_reference(path)  # the premise: transformers' own load maps the files while it reads
    assert len({f for mapped, _ in seen for f in mapped}) == len(files)


def test_directory_without_safetensors_loads_through_the_mapped_path(tmp_path, dirs):
    import shutil

    from safetensors.torch import load_file

    src = dirs["single"]
    bin_dir = shutil.copytree(src, tmp_path / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(src / quant_load.SINGLE_FILE), bin_dir / "pytorch_model.bin")
    assert quant_load.safetensors_files(bin_dir) is None
    model = quant_load.load_4bit(bin_dir, compute_dtype="fp32")
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, mapped_reference(src)(ids()).logits)


def test_broken_index_and_missing_shard_are_load_errors(tmp_path, dirs):
    import shutil

    broken = shutil.copytree(dirs["sharded"], tmp_path / "broken")
    (broken / quant_load.INDEX_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a readable safetensors index"):
        quant_load.load_4bit(broken)
    missing = shutil.copytree(dirs["sharded"], tmp_path / "missing")
    quant_load.safetensors_files(missing)[-1].unlink()
    with pytest.raises(ModelLoadError, match="could not load the model .* in 4 bits"):
        quant_load.load_4bit(missing)


def test_release_checkpoint_copies_kept_tensors_keeps_ties_and_quantized_storage(dirs):
    model = mapped_reference(dirs["sharded"])
    emb = model.model.embed_tokens.weight
    packed = model.model.layers[0].mlp.up_proj.weight
    ptr_emb, ptr_packed = emb.data_ptr(), packed.data_ptr()
    before = emb.detach().clone()
    norm = model.model.norm.weight
    norm.data = norm.data.bfloat16()
    quant_model.release_checkpoint(model, torch.float32)
    assert emb.data_ptr() != ptr_emb and torch.equal(emb, before)  # a copy, same values, same Parameter
    assert model.lm_head.weight is emb
    assert packed.data_ptr() == ptr_packed  # 4-bit storage left as it is
    assert norm.dtype == torch.float32
    quant_model.release_checkpoint(model)  # dtype None keeps dtypes
    assert norm.dtype == torch.float32
