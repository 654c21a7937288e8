"""The ``lorakit`` command: one thin function per verb (parse -> call the library -> print).

Verbs: ``train``, ``generate``, ``chat``, ``eval``, ``merge``, ``inspect``, ``serve``. The
work is done by :mod:`lorakit.train.loop`, :mod:`lorakit.runs`, :mod:`lorakit.generation`,
:mod:`lorakit.evaluation`, :mod:`lorakit.merging`, :mod:`lorakit.inspection` and :mod:`lorakit.serve`;
this module only turns arguments into calls and results into text.

Exit codes: 0 success; 2 a user error (any :class:`~lorakit.errors.LorakitError`,
a bad argument, a missing file), printed as one ``error: ...`` line on stderr;
1 an internal error (anything else), with a pointer to ``--debug``; 130 on Ctrl-C.
``lorakit --debug VERB ...`` (or ``LORAKIT_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .allocator import relaunch_under_jemalloc
from .errors import LorakitError

try:  # typer >= 0.22 vendors its own click as typer._click; older typers use click itself
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _click_errors

__all__ = ["app", "main"]

app = typer.Typer(
    name="lorakit",
    help="LoRA fine-tuning that is fast on a plain CPU and speaks PEFT's on-disk format.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

RunArg = Annotated[str, typer.Argument(help="A run directory (from `lorakit train`) or an adapter directory.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="Base model (model dir, .gguf file or default name); overrides the run's / adapter's."
    ),
]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate per answer.")]
StaticCacheOpt = Annotated[
    bool,
    typer.Option(
        "--static-cache",
        help="Decode with a static KV cache: on a GPU each step replays one CUDA graph (several times the "
        "tokens/s of plain decoding there); the same answers.",
    ),
]


class LoadDtype(str, Enum):
    """Base-model weight dtypes for ``generate``, ``chat`` and ``eval``."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def _check_device(value: str) -> str:
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(f"{value!r} is not a torch device; use e.g. cpu, cuda or cuda:1.") from None
    return value


DtypeOpt = Annotated[
    LoadDtype,
    typer.Option(
        "--dtype",
        help="Weight dtype of the base model; auto = the dtype its weights are stored in (the adapter stays fp32).",
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", callback=_check_device, help="Where to run the model, e.g. cpu, cuda, cuda:1.")
]


class Quantize(str, Enum):
    """``--quantize`` of ``generate``, ``chat``, ``eval`` and ``serve``."""

    none = "none"
    int8 = "int8"
    nf4 = "nf4"
    fp4 = "fp4"


QuantizeOpt = Annotated[
    Quantize,
    typer.Option(
        "--quantize",
        help="int8: the base's Linear layers in int8 (weights and matmuls, CPU; faster decoding) and the output "
        "head's weights in int8, the adapter fp32 on top; nf4 / fp4: a 4-bit (QLoRA) base; none: as stored (a run "
        "trained on a 4-bit base reopens on it).",
    ),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """LoRA fine-tuning that is fast on a plain CPU and speaks PEFT's on-disk format."""
    # main() reads --debug from argv itself, so errors raised while parsing see it too.


def _quiet_transformers() -> None:
    """No per-load progress bars from transformers: the verbs print what matters themselves."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _open(
    run_or_adapter: str, model: str | None, dtype: LoadDtype, device: str, quantize: Quantize = Quantize.none
) -> tuple[Any, Any, Any]:
    """Open a run or adapter dir for generate / chat / eval (transformers' load chatter off)."""
    from lorakit import runs

    _quiet_transformers()
    return runs.open_adapter(run_or_adapter, model=model, dtype=dtype.value, device=device, quantize=quantize.value)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)  # long lines stay whole


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="The YAML run config.")],
    set_: Annotated[
        list[str], typer.Option("--set", help="Override a config key, e.g. --set train.lr=1e-4 (repeatable).")
    ] = [],  # noqa: B006
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    model: ModelOpt = None,
) -> None:
    """Inject LoRA into the base model and fine-tune it as the YAML config says."""
    from lorakit.errors import TrainingInterrupted
    from lorakit.train.loop import train as run_training  # heavy: import on use

    overrides = list(set_) + ([f"model={model}"] if model is not None else [])
    try:
        result = run_training(config, overrides=overrides, resume=resume)
    except TrainingInterrupted as e:  # Ctrl-C: the loop checkpointed the last step
        raise _Interrupted(str(e)) from e
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    # The loop prints its own summary; point at what to do next.
    _console().print(f"next: lorakit generate {result.run_dir} --compare-base --prompt '...'", markup=False)


class _Interrupted(Exception):
    """Ctrl-C inside a verb that has something to say about it (e.g. where to resume)."""


def _read_prompts(ctx: typer.Context, prompt: str | None, prompts_file: Path | None) -> list[str]:
    prompts = [prompt] if prompt is not None else []
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise typer.BadParameter(f"{prompts_file} does not exist.", ctx=ctx, param_hint="--prompts-file")
        prompts += [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise typer.BadParameter(f"{prompts_file} holds no prompt.", ctx=ctx, param_hint="--prompts-file")
    if not prompts:
        raise typer.BadParameter(
            "give --prompt TEXT or --prompts-file FILE (one prompt per line).", ctx=ctx, param_hint="--prompt"
        )
    return prompts


@app.command()
def generate(
    ctx: typer.Context,
    run_or_adapter: RunArg,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The user message.")] = None,
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", help="A text file with one prompt per line.")
    ] = None,
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="Also answer with the adapter disabled and show both side by side.")
    ] = False,
    max_new_tokens: MaxNewOpt = 128,
    model: ModelOpt = None,
    dtype: DtypeOpt = LoadDtype.auto,
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = Quantize.none,
    static_cache: StaticCacheOpt = False,
) -> None:
    """Answer prompts with the adapter (greedy), optionally next to the base model's answers."""
    from lorakit import generation

    prompts = _read_prompts(ctx, prompt, prompts_file)
    lm, tokenizer, _ = _open(run_or_adapter, model, dtype, device, quantize)
    if compare_base:
        _print_comparison(generation.compare_base(lm, tokenizer, prompts, max_new_tokens=max_new_tokens))
        return
    console = _console()
    for i, p in enumerate(prompts):
        answer = generation.generate(lm, tokenizer, p, max_new_tokens=max_new_tokens, static_cache=static_cache)
        if len(prompts) == 1:
            console.print(answer, markup=False)
        else:
            console.rule(f"prompt {i + 1}")
            console.print(p, markup=False, style="bold")
            console.print(answer, markup=False)


def _print_comparison(rows: list[tuple[str, str, str]]) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    if console.width >= 100:
        table = Table(show_lines=True, expand=True)
        table.add_column("prompt", ratio=1)
        table.add_column("base model", ratio=2)
        table.add_column("with adapter", ratio=2)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # model output is not rich markup
        console.print(table)
        return
    for i, (p, base, tuned) in enumerate(rows):  # narrow terminal: labelled blocks
        console.rule(f"prompt {i + 1}")
        console.print(p, markup=False, style="bold")
        console.print("[base model]", style="dim", markup=False)
        console.print(base, markup=False)
        console.print("[with adapter]", style="dim", markup=False)
        console.print(tuned, markup=False)


@app.command()
def chat(
    run_or_adapter: RunArg,
    max_new_tokens: MaxNewOpt = 256,
    model: ModelOpt = None,
    dtype: DtypeOpt = LoadDtype.auto,
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = Quantize.none,
    static_cache: StaticCacheOpt = False,
) -> None:
    """Chat with the adapted model in the terminal (/reset clears the history, /exit or Ctrl-D quits)."""
    from lorakit import generation

    lm, tokenizer, info = _open(run_or_adapter, model, dtype, device, quantize)
    console = _console()
    console.print(f"chatting with {info.adapter_dir} (/reset clears the history, /exit quits)", style="dim")
    history: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ")
        except EOFError:
            console.print()
            return
        command = text.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history.clear()
            console.print("(history cleared)", style="dim")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": text})
        answer = generation.generate(lm, tokenizer, history, max_new_tokens=max_new_tokens, static_cache=static_cache)
        history.append({"role": "assistant", "content": answer})
        console.print(f"assistant> {answer}", markup=False)


@app.command("eval")
def eval_(
    run_or_adapter: RunArg,
    data: Annotated[
        Path, typer.Option("--data", help="A JSONL file (chat, prompt/completion, alpaca or text rows, or DPO pairs).")
    ],
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", min=2, help="Cut examples to this many tokens.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens", min=1, help="Most tokens per answer for exact match (default: longest reference + 16)."
        ),
    ] = None,
    no_exact_match: Annotated[bool, typer.Option("--no-exact-match", help="Skip generating answers.")] = False,
    model: ModelOpt = None,
    dtype: DtypeOpt = LoadDtype.auto,
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = Quantize.none,
) -> None:
    """Eval loss, perplexity and exact match of greedy answers on a JSONL file.

    On preference pairs (prompt, chosen, rejected): the reward accuracy and margins of
    the adapter against its DPO reference (the run's starting adapter, or the base).
    """
    from lorakit import evaluation, runs
    from lorakit.pairs import first_pair_line

    lm, tokenizer, _ = _open(run_or_adapter, model, dtype, device, quantize)
    if first_pair_line(data):
        _print_preferences(
            evaluation.evaluate_preferences(
                lm, tokenizer, data, run_dir=runs.find_adapter_dir(run_or_adapter)[1], batch_size=batch_size
            )
        )
        return
    result = evaluation.evaluate(
        lm,
        tokenizer,
        data,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        exact_match=not no_exact_match,
    )
    console = _console()
    console.print(
        f"eval_loss    {result['eval_loss']:.4f}  ({result['label_tokens']} label tokens, "
        f"{result['examples']} examples)"
    )
    console.print(f"perplexity   {result['perplexity']:.3f}")
    if result["exact_match"] is None:
        console.print(
            "exact_match  n/a (no row with a reference answer)" if not no_exact_match else "exact_match  skipped"
        )
    else:
        hits = round(result["exact_match"] * result["exact_match_rows"])
        console.print(f"exact_match  {result['exact_match']:.3f}  ({hits}/{result['exact_match_rows']})")


@app.command()
def merge(
    run_or_adapter: RunArg,
    out_dir: Annotated[Path, typer.Argument(help="Where to write the merged transformers model.")],
    dtype: Annotated[str, typer.Option("--dtype", help="Weight dtype of the merged model: fp32 or bf16.")] = "fp32",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    model: ModelOpt = None,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="4-bit runs: merge into these full-precision weights instead of dequant(W4)."),
    ] = None,
    probe: Annotated[
        bool, typer.Option("--probe/--no-probe", help="Compare merged and unmerged logits on a few probe inputs.")
    ] = True,
) -> None:
    """Fold the adapter into the base weights (shard by shard) and save a plain transformers model directory."""
    from lorakit import merging

    _quiet_transformers()

    report = merging.merge_adapter(
        run_or_adapter, out_dir, dtype=dtype, model=model, base=base, overwrite=force, probe=probe
    )
    console = _console()
    if report.quantization is not None:
        q = report.quantization
        what = "the original full-precision weights" if base is not None else "dequant(W4), the weights it trained on"
        console.print(f"adapter trained on a 4-bit base ({q.quantization}); merged into {what}")
    for module, ratio in report.layer_ratios:
        console.print(f"  {module}: ||W - dequant(W4)|| / ||ΔW|| = {ratio:.3g}")
    if report.max_probe_diff is not None:
        console.print(f"largest merged-vs-unmerged logit difference on the probe inputs: {report.max_probe_diff:.3g}")
    console.print(
        f"merged model written to {report.out_dir} ({report.shards} shard(s) streamed; load it with "
        "AutoModelForCausalLM.from_pretrained)"
    )


@app.command()
def inspect(run_or_adapter: RunArg) -> None:
    """Targeted modules, ranks, alphas, parameter counts and update norms ||scaling·B·A||."""
    from rich.table import Table
    from rich.text import Text

    from lorakit import inspection, runs

    rows = inspection.inspect_adapter(run_or_adapter)
    prefix = _common_prefix([row["module"] for row in rows if row["kind"] != "total"])
    title = f"adapter {run_or_adapter}" + (f" (module names under {prefix})" if prefix else "")
    table = Table(title=Text(title))
    for name in ("module", "kind", "r", "alpha", "scaling", "params", "‖ΔW‖"):
        if name == "module":
            table.add_column(name, overflow="fold")
        else:
            table.add_column(name, justify="left" if name == "kind" else "right", no_wrap=True)
    fmt = lambda v, spec="": "" if v is None else format(v, spec)  # noqa: E731
    for row in rows:
        module = row["module"] if row["kind"] == "total" else row["module"][len(prefix) :]
        table.add_row(
            Text(module),
            row["kind"],
            fmt(row["r"]),
            fmt(row["alpha"], "g"),
            fmt(row["scaling"], ".4g"),
            fmt(row["params"], ","),
            fmt(row["norm"], ".4g"),
            end_section=row is rows[-2],
        )
    console = _console()
    console.print(table)
    metrics = runs.last_metrics(run_or_adapter)
    if metrics:
        console.print("last metrics: " + ", ".join(f"{k}={_short(v)}" for k, v in metrics.items()), markup=False)


@app.command()
def serve(
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter", help="NAME=PATH: serve the adapter (or run) directory PATH as model NAME; repeat for more."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Base model (model dir, .gguf file or default name).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; the default serves this machine only.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most requests generated together.")] = 8,
    admin_token: Annotated[
        str | None,
        typer.Option(
            "--admin-token",
            envvar="LORAKIT_ADMIN_TOKEN",
            help="Turn on /v1/load_lora_adapter and /v1/unload_lora_adapter, guarded by this bearer token.",
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Largest max_tokens a request may ask.")
    ] = 4096,
    dtype: DtypeOpt = LoadDtype.auto,
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = Quantize.none,
) -> None:
    """Serve the base model and adapters over OpenAI's API until Ctrl-C (one log line per request)."""
    from lorakit.serve import ServeLimits
    from lorakit.serve import serve as run_server

    adapters: dict[str, str] = {}
    for item in adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"{item!r}: use NAME=PATH, e.g. --adapter quick=runs/quickstart.")
        if name in adapters:
            raise typer.BadParameter(f"adapter name {name!r} is given twice.")
        adapters[name] = path
    _quiet_transformers()
    run_server(
        model,
        adapters,
        host=host,
        port=port,
        max_batch=max_batch,
        admin_token=admin_token,
        limits=ServeLimits(max_tokens=max_tokens),
        dtype=dtype.value,
        device=device,
        quantize=quantize.value,
    )


def _print_preferences(result: dict[str, Any]) -> None:
    """``lorakit eval``'s lines for a pairs file (TRL's metric names)."""
    console = _console()
    hits = round(result["rewards/accuracies"] * result["pairs"])
    console.print(f"rewards/accuracies  {result['rewards/accuracies']:.3f}  ({hits}/{result['pairs']} pairs)")
    for name in ("rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        console.print(f"{name:<19} {result[name]:.4f}")
    console.print(
        f"eval_loss           {result['eval_loss']:.4f}  ({result['loss_type']}, beta {result['beta']}, "
        f"reference: {result['reference']})",
        markup=False,
    )


def _common_prefix(names: list[str]) -> str:
    """The longest common dotted prefix (ending in '.') of module names; '' for fewer than two."""
    if len(names) < 2:
        return ""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    return "".join(f"{p}." for p in common)


def _short(value: Any) -> str:
    return format(value, ".4g") if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    """Run the ``lorakit`` command (the console-script entry point).

    Args:
        argv: The arguments after the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0 success, 2 user error, 1 internal error, 130 interrupted.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LORAKIT_DEBUG", "") not in ("", "0")
    exits = tuple({typer.Exit, getattr(_click_errors, "Exit", typer.Exit)})
    aborts = tuple({typer.Abort, getattr(_click_errors, "Abort", typer.Abort), KeyboardInterrupt})
    try:
        verb = next((a for a in args if not a.startswith("-")), None)
        if argv is None and verb == "train":  # the real process: start again under jemalloc if found
            relaunch_under_jemalloc(args)  # returns only where nothing is relaunched (lorakit.allocator)
        code = app(args=args, prog_name="lorakit", standalone_mode=False)
    except exits as e:  # raised by a verb itself (typer.Exit(code))
        code = e.exit_code
    except _click_errors.NoArgsIsHelpError as e:  # bare `lorakit` / `lorakit VERB`: show the help
        print(e.format_message(), file=sys.stderr)
        return 2
    except _click_errors.UsageError as e:  # typer's own argument parsing, and our BadParameter
        where = e.ctx.command_path if e.ctx is not None else "lorakit"
        return _fail(debug, 2, f"error: {_one_line(e.format_message())} (see `{where} --help`)")
    except (LorakitError, FileNotFoundError, _click_errors.ClickException) as e:
        message = e.format_message() if isinstance(e, _click_errors.ClickException) else str(e)
        return _fail(debug, 2, f"error: {_one_line(message)}")
    except _Interrupted as e:
        return _fail(debug, 130, f"interrupted: {_one_line(str(e))}")
    except aborts:
        return _fail(debug, 130, "interrupted")
    except Exception as e:  # noqa: BLE001 - the boundary: anything else is our bug
        hint = "" if debug else " (run `lorakit --debug ...` for the traceback, and please report it)"
        return _fail(debug, 1, f"internal error: {type(e).__name__}: {_one_line(str(e))}{hint}")
    if code == 130:  # typer turns Ctrl-C inside a verb into exit code 130
        print("\ninterrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0


def _fail(debug: bool, code: int, message: str) -> int:
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr)
    return code


def _one_line(message: str) -> str:
    return " ".join(message.split())
