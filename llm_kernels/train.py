"""``llm-kernels train`` and ``llm-kernels generate``: the reference GPT on a text file.

Training: byte-level tokens (UTF-8 bytes 0..255, 256 = [MASK]), the first 90% of the file for
training and the last 10% held out, AdamW, linear warm-up then cosine decay of the learning
rate, gradient clipping, bf16 autocast on a GPU, and either the causal LM objective (next byte)
or masked LM (BERT: 15% of positions, 80% [MASK] / 10% random byte / 10% unchanged).

Reproducibility: batch ``s`` is drawn from a generator seeded by (seed, s), so the data
position is the step count. A checkpoint (``OUT/ckpt.pt``, written atomically) holds the model
config and weights, the optimizer, the step, the run's arguments, the data file's digest, the
RNG states of every rank and the loss history, and ``--resume`` continues a run with the same
losses, bit for bit on a CPU, as if it had never stopped.

Multi-process: under ``torchrun --nproc_per_node N`` the global batch is split across ranks
with DistributedDataParallel (NCCL on GPU, gloo on CPU); only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import math
import os
import random
import secrets
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import llm_kernels as lk
from llm_kernels.backends import AUTO, BACKENDS
from llm_kernels.models.gpt import GPT, IGNORE_INDEX, GPTConfig

CHECKPOINT_NAME = "ckpt.pt"
CHECKPOINT_FORMAT = "llm_kernels.gpt/1"
LOSS_PLOT_NAME = "loss.png"
TRAIN_FRACTION = 0.9
MLM_RATE, MLM_MASK, MLM_RANDOM = 0.15, 0.8, 0.1
# Dense bf16/fp16 tensor-core peak of one H100/H200 SXM (FLOP/s), for MFU.
PEAK_FLOPS_16BIT = {"H100": 989e12, "H200": 989e12}

# Model arguments: taken from the checkpoint on --resume, and an error there if given and
# different. Run arguments: taken from the checkpoint on --resume unless given.
MODEL_DEFAULTS = {"n_layer": 4, "n_head": 4, "n_kv_head": None, "d_model": 128, "d_ff": None,
                  "max_seq_len": None, "mlp": "gelu", "norm": "layernorm", "rope": False,
                  "objective": "clm"}
RUN_DEFAULTS = {"steps": 1000, "batch_size": 32, "seq_len": 128, "lr": 1e-3, "min_lr": None,
                "warmup": None, "weight_decay": 0.1, "grad_clip": 1.0, "dropout": 0.0,
                "eval_interval": 250, "eval_iters": 20, "sample_interval": 500,
                "checkpoint_interval": 500, "seed": 1337}
# Run settings derived from others unless given; a checkpoint lists the ones it derived, and
# --resume derives them again (from a new --lr or --steps) instead of keeping the old values.
DERIVED_RUN_KEYS = ("min_lr", "warmup")
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.manual_seed accepts
DEFAULT_MAX_NEW_TOKENS = 200


class InputError(ValueError):
    """A bad argument or input file: reported as one ``error:`` line, exit code 2."""


# ----------------------------------------------------------------------------- tokens and data

class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; token 256 is [MASK] (masked LM). Vocabulary 257."""

    vocab_size = 257
    n_bytes = 256
    mask_id = 256

    def encode(self, text: str) -> list[int]:
        """Text to its UTF-8 bytes. The lone surrogates U+DC80..U+DCFF, Python's stand-ins
        for undecodable bytes (as in command-line arguments), become those raw bytes;
        UnicodeEncodeError for any other lone surrogate."""
        return list(text.encode("utf-8", errors="surrogateescape"))

    def decode(self, ids) -> str:
        """Bytes to text (invalid UTF-8 replaced by U+FFFD); [MASK] shows as '_'."""
        return b"".join(bytes([i]) if i < self.n_bytes else b"_" for i in ids).decode(
            "utf-8", errors="replace")


def load_tokens(path: str) -> torch.Tensor:
    """The bytes of a UTF-8 text file as a uint8 tensor (N,); InputError for a missing,
    empty or binary (NUL bytes, invalid UTF-8) file."""
    if not os.path.exists(path):
        raise InputError(f"data file {path!r} does not exist")
    if not os.path.isfile(path):
        raise InputError(f"data file {path!r} is not a regular file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise InputError(f"data file {path!r} is empty")
    if b"\x00" in raw:
        raise InputError(f"data file {path!r} looks binary (it contains NUL bytes): "
                         "give a UTF-8 text file")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"data file {path!r} is not UTF-8 text (invalid byte at offset "
                         f"{exc.start})") from None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def split_tokens(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out): the first 90% and the last 10%; each must hold seq_len + 1 bytes."""
    n_train = int(len(tokens) * TRAIN_FRACTION)
    train, held_out = tokens[:n_train], tokens[n_train:]
    if min(len(train), len(held_out)) < seq_len + 1:
        raise InputError(f"the data file has {len(tokens)} bytes: too small for --seq-len "
                         f"{seq_len} (the 10% held-out split needs at least {seq_len + 1})")
    return train, held_out


def derived_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed hashed from (seed, stream, index): reproducible, independent streams."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(seed: int, stream: str, index: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(seed, stream, index))


def mask_tokens(tokens: torch.Tensor, generator: torch.Generator,
                tokenizer: ByteTokenizer = ByteTokenizer()) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of tokens (B, T): round(15% of T) positions per row (at least 1) are
    selected; of those 80% become [MASK], 10% a random byte, 10% stay. Returns (inputs,
    targets), targets = the original token at selected positions and -100 elsewhere."""
    b, t = tokens.shape
    n_selected = max(1, round(MLM_RATE * t))
    order = torch.rand(b, t, generator=generator).argsort(dim=1)
    selected = torch.zeros(b, t, dtype=torch.bool).scatter_(1, order[:, :n_selected], True)
    action = torch.rand(b, t, generator=generator)
    random_bytes = torch.randint(0, tokenizer.n_bytes, (b, t), generator=generator)
    inputs = torch.where(selected & (action < MLM_MASK), tokenizer.mask_id, tokens)
    to_random = selected & (action >= MLM_MASK) & (action < MLM_MASK + MLM_RANDOM)
    inputs = torch.where(to_random, random_bytes, inputs)
    targets = torch.where(selected, tokens, IGNORE_INDEX)
    return inputs, targets


def make_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, objective: str,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch_size, seq_len) int64, from random windows of tokens."""
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()  # (B, T + 1)
    if objective == "clm":
        return windows[:, :-1], windows[:, 1:]
    return mask_tokens(windows[:, :-1], generator)


@dataclasses.dataclass
class Data:
    train: torch.Tensor
    held_out: torch.Tensor
    record: dict  # path, size and digest of the file, kept in checkpoints


def load_data(path: str, seq_len: int) -> Data:
    tokens = load_tokens(path)
    train, held_out = split_tokens(tokens, seq_len)
    return Data(train, held_out, {"path": os.path.abspath(path), "bytes": len(tokens),
                                  "sha256": data_digest(tokens)})


def check_resume(ckpt: dict, data: Data, world_size: int) -> None:
    """The checkpoint's run used the same data file and number of processes."""
    if ckpt["data"].get("sha256") != data.record["sha256"]:
        raise InputError(f"the checkpoint was trained on other data ({ckpt['data'].get('path')}, "
                         f"{ckpt['data'].get('bytes')} bytes) than {data.record['path']!r}")
    if len(ckpt["rng"]) != world_size:
        raise InputError(f"the checkpoint was written by {len(ckpt['rng'])} process(es), this "
                         f"run has {world_size}")


# ----------------------------------------------------------------------------- arguments

def register(subparsers) -> None:
    """Add the ``train`` and ``generate`` subcommands to an argparse subparsers object."""
    train = subparsers.add_parser("train", help="train the reference GPT on a text file",
                                  description="Train the reference GPT on a UTF-8 text file.")
    _add_train_arguments(train)
    train.set_defaults(func=train_command)
    gen = subparsers.add_parser("generate", help="sample text from a checkpoint",
                                description="Continue a prompt with the model of a checkpoint.")
    gen.add_argument("--checkpoint", required=True, metavar="PATH",
                     help=f"a checkpoint file, or a train --out folder (its {CHECKPOINT_NAME})")
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                     help=f"bytes to add (default: as many as the model's max_seq_len leaves "
                          f"after the prompt, at most {DEFAULT_MAX_NEW_TOKENS})")
    gen.add_argument("--temperature", type=float, default=0.8, metavar="T",
                     help="softmax temperature, 0 = greedy (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=None, metavar="K",
                     help="sample from the k most likely bytes only (default: all)")
    gen.add_argument("--seed", type=int, default=0, metavar="N",
                     help="seeds the sampling (default: 0)")
    gen.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    gen.add_argument("--backend", default=AUTO, help="torch, triton, cuda or auto (default)")
    gen.set_defaults(func=generate_command)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="FILE", help="a UTF-8 text file")
    p.add_argument("--out", default="out", metavar="DIR", help="checkpoint and loss curve")
    p.add_argument("--resume", action="store_true", help="continue from DIR/ckpt.pt")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end this run after STEP steps (with a checkpoint); --resume continues")
    p.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    p.add_argument("--backend", default=AUTO, help="torch, triton, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bf16 autocast on a GPU, float32 on CPU")
    run = p.add_argument_group("run (on --resume, default to the checkpoint's)")
    for name, kind, help_text in (
            ("steps", int, "total optimizer steps"),
            ("batch-size", int, "global batch in sequences"),
            ("seq-len", int, "tokens per sequence"),
            ("lr", float, "peak learning rate"),
            ("min-lr", float, "final learning rate of the cosine (default: lr / 10)"),
            ("warmup", int, "linear warm-up steps (default: min(100, steps / 10))"),
            ("weight-decay", float, "AdamW weight decay on matrices and embeddings"),
            ("grad-clip", float, "max gradient norm, 0 = off"),
            ("dropout", float, "on the attention output and the MLP output"),
            ("eval-interval", int, "steps between held-out evaluations"),
            ("eval-iters", int, "held-out batches per evaluation"),
            ("sample-interval", int, "steps between printed samples, 0 = off"),
            ("checkpoint-interval", int, "steps between checkpoints"),
            ("seed", int, "seeds the init, the batches and the masks")):
        default = RUN_DEFAULTS[name.replace("-", "_")]
        run.add_argument("--" + name, type=kind, default=None,
                         help=help_text + ("" if default is None else f" (default: {default})"))
    model = p.add_argument_group("model (on --resume, must match the checkpoint)")
    for name, kind, help_text in (
            ("n-layer", int, "blocks (4)"), ("n-head", int, "query heads (4)"),
            ("n-kv-head", int, "key/value heads, GQA (n-head)"), ("d-model", int, "width (128)"),
            ("d-ff", int, "feed-forward width (4 d-model)"),
            ("max-seq-len", int, "longest sequence the model takes (seq-len)")):
        model.add_argument("--" + name, type=kind, default=None, help=help_text)
    model.add_argument("--mlp", choices=("gelu", "swiglu"), default=None, help="(gelu)")
    model.add_argument("--norm", choices=("layernorm", "rmsnorm"), default=None, help="(layernorm)")
    model.add_argument("--rope", action=argparse.BooleanOptionalAction, default=None,
                       help="rotary position embedding instead of learned positions")
    model.add_argument("--objective", choices=("clm", "mlm"), default=None,
                       help="causal LM or masked LM with a bidirectional encoder (clm)")


@dataclasses.dataclass
class RunSpec:
    """Every resolved setting of a training run."""

    data: str
    out: str
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    backend: str
    stop_at: int
    config: GPTConfig
    objective: str
    run: dict
    derived: tuple  # the DERIVED_RUN_KEYS that were derived, not given


def _resolve_model(args, saved: Optional[dict]) -> dict:
    given = {k: getattr(args, k) for k in MODEL_DEFAULTS if getattr(args, k) is not None}
    if saved is None:
        model = {**MODEL_DEFAULTS, **given}
    else:
        model = saved
        for key, value in given.items():
            if value != saved[key]:
                raise InputError(f"the checkpoint's model has {key}={saved[key]!r} but "
                                 f"--{key.replace('_', '-')} {value!r} was given")
    return model


def _resolve_run(args, saved: Optional[dict], saved_derived=()) -> tuple[dict, tuple]:
    """(run settings, the DERIVED_RUN_KEYS derived): given > the checkpoint's > defaults,
    where the checkpoint's derived settings count as not given."""
    given = {k: getattr(args, k) for k in RUN_DEFAULTS if getattr(args, k) is not None}
    kept = {k: v for k, v in (saved or {}).items() if k not in saved_derived}
    run = {**RUN_DEFAULTS, **kept, **given}
    derived = tuple(k for k in DERIVED_RUN_KEYS if run[k] is None)
    if run["min_lr"] is None:
        run["min_lr"] = run["lr"] / 10
    if run["warmup"] is None:
        run["warmup"] = min(100, run["steps"] // 10)
    return run, derived


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_seed(seed: int) -> None:
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise InputError(f"--seed must be between {low} and {high}, got {seed}")


def _check_run(run: dict, stop_at: Optional[int], world_size: int) -> None:
    for key in ("steps", "batch_size", "seq_len", "eval_interval", "eval_iters",
                "checkpoint_interval"):
        if run[key] < 1:
            raise InputError(f"{_flag(key)} must be >= 1, got {run[key]}")
    for key in ("warmup", "sample_interval"):
        if run[key] < 0:
            raise InputError(f"{_flag(key)} must be >= 0, got {run[key]}")
    if not (math.isfinite(run["lr"]) and run["lr"] > 0):
        raise InputError(f"--lr must be a finite number > 0, got {run['lr']}")
    for key in ("min_lr", "weight_decay", "grad_clip"):
        if not (math.isfinite(run[key]) and run[key] >= 0):
            raise InputError(f"{_flag(key)} must be a finite number >= 0, got {run[key]}")
    if run["min_lr"] > run["lr"]:
        raise InputError(f"--min-lr {run['min_lr']} must be <= --lr {run['lr']}")
    check_seed(run["seed"])
    if stop_at is not None and stop_at < 1:
        raise InputError(f"--stop-at must be >= 1, got {stop_at}")
    if run["batch_size"] % world_size:
        raise InputError(f"--batch-size {run['batch_size']} must be a multiple of the "
                         f"{world_size} processes")


def _model_config(model: dict, run: dict, backend: str) -> GPTConfig:
    seq_len = run["seq_len"]
    model["n_kv_head"] = model["n_kv_head"] or model["n_head"]
    model["d_ff"] = model["d_ff"] or 4 * model["d_model"]
    model["max_seq_len"] = model["max_seq_len"] or seq_len
    if seq_len > model["max_seq_len"]:
        raise InputError(f"--seq-len {seq_len} exceeds the model's max_seq_len "
                         f"{model['max_seq_len']}")
    try:
        return GPTConfig(vocab_size=ByteTokenizer.vocab_size, n_layer=model["n_layer"],
                         n_head=model["n_head"], n_kv_head=model["n_kv_head"],
                         d_model=model["d_model"], d_ff=model["d_ff"],
                         max_seq_len=model["max_seq_len"], dropout=run["dropout"],
                         causal=model["objective"] == "clm", mlp=model["mlp"],
                         norm=model["norm"], rope=model["rope"], backend=backend)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad model arguments: {exc}") from None


def resolve_device(name: Optional[str], local_rank: int = 0) -> torch.device:
    """--device (default cuda when visible, else cpu); a GPU per local rank under torchrun."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda but no CUDA device is visible")
        device = torch.device("cuda", device.index if device.index is not None else local_rank)
        if device.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def resolve_backend(name: str) -> str:
    """A backend name that can run here, else InputError with the reason."""
    if name not in BACKENDS + (AUTO,):
        raise InputError(f"unknown --backend {name!r}: choose from {', '.join(BACKENDS + (AUTO,))}")
    if name != AUTO:
        ok, why = lk.available_backends()[name]
        if not ok:
            raise InputError(f"--backend {name} is unavailable: {why}")
    return name


def _amp_dtype(choice: str, device: torch.device) -> Optional[torch.dtype]:
    if choice == "bfloat16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def prepare_out_dir(out: str) -> None:
    """Create the --out folder and check that files can be written there (a uniquely named
    probe file is created and removed: nothing is overwritten); InputError if not."""
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write to --out {out!r}: {exc.strerror or exc}") from None


def _check_out_dir(out: str, resume: bool) -> str:
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out!r} is a file, not a directory")
    path = os.path.join(out, CHECKPOINT_NAME)
    if resume and not os.path.isfile(path):
        raise InputError(f"--resume: no checkpoint at {path!r}")
    if not resume and os.path.exists(path):
        raise InputError(f"{path!r} exists: pass --resume to continue that run or choose "
                         "another --out")
    return path


def resolve_spec(args, world_size: int = 1, local_rank: int = 0) -> tuple[RunSpec, Optional[dict]]:
    """Check every argument and input (nothing is written); returns the spec and, on
    --resume, the loaded checkpoint."""
    backend = resolve_backend(args.backend)
    device = resolve_device(args.device, local_rank)
    ckpt_path = _check_out_dir(args.out, args.resume)
    ckpt = load_checkpoint(ckpt_path, for_resume=True) if args.resume else None
    model = _resolve_model(args, ckpt["model_args"] if ckpt else None)
    run, derived = _resolve_run(args, ckpt["run"] if ckpt else None,
                                ckpt.get("derived", ()) if ckpt else ())
    _check_run(run, args.stop_at, world_size)
    config = _model_config(dict(model), run, backend)
    stop_at = run["steps"] if args.stop_at is None else min(args.stop_at, run["steps"])
    spec = RunSpec(data=args.data, out=args.out, device=device,
                   amp_dtype=_amp_dtype(args.dtype, device), backend=backend, stop_at=stop_at,
                   config=config, objective=model["objective"], run=run, derived=derived)
    return spec, ckpt


# ----------------------------------------------------------------------------- checkpoints

def atomic_write(path: str, write) -> None:
    """Call write(file) on a temp file in path's folder, flush, fsync, then rename it over
    path: readers see the old file or the complete new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as umask allows
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """'Type: message' on one line: the message's first line, joined with the next when it
    only introduces it (ends with ':'), cut to ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else \
        (lines[0] if lines else "")
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def _and_more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _shape_of(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def weights_mismatch(model: torch.nn.Module, weights) -> Optional[str]:
    """None when ``weights`` (a state dict) fit ``model``, else one line naming the first
    missing, unexpected and wrongly shaped entries."""
    if not isinstance(weights, dict):
        return f"the weights are a {type(weights).__name__}, not a state dict"
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and not (
        isinstance(weights[k], torch.Tensor) and weights[k].shape == expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {missing[0]}{_and_more(missing)}")
    if unexpected:
        problems.append(f"unexpected {unexpected[0]}{_and_more(unexpected)}")
    if reshaped:
        key = reshaped[0]
        problems.append(f"{key} is {_shape_of(weights[key])} where the model has "
                        f"{_shape_of(expected[key])}{_and_more(reshaped)}")
    return "; ".join(problems) or None


CHECKPOINT_KEYS = ("format", "config", "model")
RESUME_KEYS = ("optimizer", "step", "model_args", "run", "data", "rng", "history")


def load_checkpoint(path: str, for_resume: bool = False) -> dict:
    """Read and check a checkpoint (CPU tensors); InputError if missing, corrupt or foreign."""
    if not os.path.exists(path):
        raise InputError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} is not a regular file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise InputError(f"cannot read checkpoint {path!r} ({_one_line(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path!r} is not an llm-kernels GPT checkpoint")
    missing = [k for k in CHECKPOINT_KEYS + (RESUME_KEYS if for_resume else ()) if k not in ckpt]
    if for_resume and not missing:
        missing = [f"{part}.{k}" for part, keys in (("model_args", MODEL_DEFAULTS),
                                                    ("run", RUN_DEFAULTS))
                   for k in keys if k not in ckpt[part]]
    if missing:
        raise InputError(f"checkpoint {path!r} lacks {', '.join(missing)}")
    try:
        GPTConfig(**ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise InputError(f"checkpoint {path!r} has a bad model config ({exc})") from None
    return ckpt


def model_from_checkpoint(ckpt: dict, backend: str = AUTO) -> GPT:
    """The GPT of a checkpoint (on CPU), running on ``backend``."""
    config = GPTConfig(**{**ckpt["config"], "backend": backend})
    model = GPT(config)
    problem = weights_mismatch(model, ckpt["model"])
    if problem:
        raise InputError(f"the checkpoint's weights do not fit its config: {problem}")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise InputError(f"the checkpoint's weights do not fit its config "
                         f"({_one_line(exc)})") from None
    return model


def rng_state(device: torch.device) -> dict:
    """This process's torch (CPU and CUDA), numpy and python RNG states."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss,
                       np_gauss],
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def data_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------- distributed

@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """Rank, local rank and world size as torchrun sets them (single process otherwise)."""
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("WORLD_SIZE", "1")))


def _mean_over_ranks(value: torch.Tensor, info: DistInfo) -> float:
    if info.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value.item()


def _gather(obj, info: DistInfo) -> list:
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- training

def learning_rate(step: int, run: dict) -> float:
    """Linear warm-up to lr over `warmup` steps, then cosine decay to min_lr at `steps`."""
    lr, min_lr, warmup, total = run["lr"], run["min_lr"], run["warmup"], run["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: GPT, run: dict, device: torch.device,
                   capturable: bool = False) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices and embeddings only (fused kernels on a GPU;
    ``capturable``: its step may be captured in a CUDA graph)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": run["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=run["lr"], betas=(0.9, 0.95),
                             fused=device.type == "cuda", capturable=capturable)


def flops_per_token(model: GPT, seq_len: int) -> float:
    """6 N (forward + backward matmuls) + 12 n_layer d_model T (attention scores and values,
    counted in full as in PaLM's MFU), N = parameters without the position embedding."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.d_model * seq_len


def peak_flops(device: torch.device, amp_dtype: Optional[torch.dtype]) -> Optional[float]:
    """The device's dense peak in the training dtype when known (H100/H200 bf16), else None."""
    if device.type != "cuda" or amp_dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS_16BIT.items() if key in name), None)


@dataclasses.dataclass
class TrainResult:
    model: GPT
    step: int
    history: dict
    checkpoint: Optional[str]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the steps done and the step of the last checkpoint (None
    when there is none); str() is the one line the train command prints."""

    def __init__(self, step: int, total: int, saved_step: Optional[int], path: str):
        super().__init__(step, total, saved_step, path)
        self.step, self.total, self.saved_step, self.path = step, total, saved_step, path

    def __str__(self) -> str:
        done = f"interrupted after step {self.step} of {self.total}"
        if self.saved_step is None:
            return f"{done}: no checkpoint was written yet, so a new run starts from step 0"
        return (f"{done}: the last checkpoint, {self.path}, is at step {self.saved_step}; "
                "--resume continues from there")


class Trainer:
    """One training run: data, model, optimizer, loop, evaluation, samples, checkpoints."""

    def __init__(self, spec: RunSpec, ckpt: Optional[dict], data: Data, info: DistInfo):
        self.spec, self.info, self.run = spec, info, spec.run
        self.device, self.tokenizer = spec.device, ByteTokenizer()
        self.train_tokens, self.held_tokens, self.data = data.train, data.held_out, data.record
        torch.manual_seed(self.run["seed"])
        self.model = GPT(spec.config).to(self.device)
        torch.manual_seed(derived_seed(self.run["seed"], "dropout", info.rank))
        self.optimizer = make_optimizer(self.model, self.run, self.device)
        self.step, self.history = 0, {"train": [], "eval": []}
        self.saved_step: Optional[int] = None  # the step of the checkpoint on disk
        if ckpt is not None:
            self._restore(ckpt)
        self.ddp = self._wrap_ddp()
        self.flops_per_token = flops_per_token(self.model, self.run["seq_len"])
        self.peak = peak_flops(self.device, spec.amp_dtype)

    def _restore(self, ckpt: dict) -> None:
        problem = weights_mismatch(self.model, ckpt["model"])
        if problem:
            raise InputError(f"the checkpoint does not fit this model: {problem}")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(f"the checkpoint does not fit this model ({_one_line(exc)})") from None
        set_rng_state(ckpt["rng"][self.info.rank], self.device)
        self.step, self.history = ckpt["step"], ckpt["history"]
        self.saved_step = self.step

    def _wrap_ddp(self):
        if self.info.world_size == 1:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def autocast(self):
        if self.spec.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.spec.amp_dtype)

    def batch(self, tokens: torch.Tensor, stream: str, index: int):
        """This rank's share of global batch `index` of `stream`, on the device."""
        run, info = self.run, self.info
        x, y = make_batch(tokens, run["batch_size"], run["seq_len"], self.spec.objective,
                          seeded_generator(run["seed"], stream, index))
        share = run["batch_size"] // info.world_size
        rows = slice(info.rank * share, (info.rank + 1) * share)
        return x[rows].to(self.device), y[rows].to(self.device)

    def train_step(self, step: int) -> float:
        lr = learning_rate(step, self.run)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.batch(self.train_tokens, "train", step)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            _, loss = self.ddp(x, y)
        loss.backward()
        if self.run["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.run["grad_clip"])
        self.optimizer.step()
        return _mean_over_ranks(loss.detach().float(), self.info)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the same eval_iters held-out batches every time."""
        self.model.eval()
        losses = []
        for i in range(self.run["eval_iters"]):
            x, y = self.batch(self.held_tokens, "eval", i)
            with self.autocast():
                losses.append(self.model(x, y)[1].float())
        self.model.train()
        return _mean_over_ranks(torch.stack(losses).mean(), self.info)

    @torch.no_grad()
    def sample(self, step: int) -> str:
        """A continuation of the held-out text's start (clm) or a fill-in of masked bytes (mlm)."""
        gen = seeded_generator(self.run["seed"], "sample", step, device=self.device)
        max_len = self.spec.config.max_seq_len
        if self.spec.config.causal:
            prompt = self.held_tokens[:min(16, max_len // 2)].long()[None].to(self.device)
            with self.autocast():
                out = self.model.generate(prompt, min(200, max_len - prompt.shape[1]),
                                          temperature=0.8, top_k=40, generator=gen)
            return self.tokenizer.decode(out[0].tolist())
        text = self.held_tokens[:min(64, max_len)].long()[None]
        inputs, targets = mask_tokens(text, seeded_generator(self.run["seed"], "sample", step))
        self.model.eval()
        with self.autocast():
            logits, _ = self.model(inputs.to(self.device))
        self.model.train()
        filled = torch.where(targets >= 0, logits.argmax(-1).cpu(), inputs)
        return (f"masked: {self.tokenizer.decode(inputs[0].tolist())!r}\n"
                f"filled: {self.tokenizer.decode(filled[0].tolist())!r}")

    def checkpoint(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "config": self.spec.config.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "run": dict(self.run),
                "model_args": self._model_args(), "data": dict(self.data),
                "rng": _gather(rng_state(self.device), self.info),
                "history": self.history, "derived": list(self.spec.derived)}

    def _model_args(self) -> dict:
        c = self.spec.config
        return {"n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head,
                "d_model": c.d_model, "d_ff": c.d_ff, "max_seq_len": c.max_seq_len, "mlp": c.mlp,
                "norm": c.norm, "rope": c.rope, "objective": self.spec.objective}

    def save(self, path: str) -> None:
        state = self.checkpoint()  # a collective (RNG states of every rank): all ranks call it
        if self.info.is_main:
            atomic_write(path, lambda f: torch.save(state, f))
            self.saved_step = self.step
            save_loss_plot(self.history, os.path.join(self.spec.out, LOSS_PLOT_NAME))

    def header(self) -> str:
        c, run = self.spec.config, self.run
        amp = "bf16 autocast" if self.spec.amp_dtype == torch.bfloat16 else "float32"
        mfu = "n/a (peak FLOP/s unknown for this device and dtype)" if self.peak is None else \
            f"against {self.peak / 1e12:.0f} TFLOP/s"
        return (f"model: {self.model.num_params() / 1e6:.2f}M parameters, {c.n_layer} layers, "
                f"d_model {c.d_model}, {c.n_head}/{c.n_kv_head} heads, {c.mlp}, {c.norm}, "
                f"{'rope' if c.rope else 'learned positions'}, {self.spec.objective}\n"
                f"data: {self.data['bytes']} bytes ({len(self.train_tokens)} train, "
                f"{len(self.held_tokens)} held out)\n"
                f"run: {run['steps']} steps of {run['batch_size']} x {run['seq_len']} tokens on "
                f"{self.device} ({amp}, backend {c.backend}, {self.info.world_size} process(es)); "
                f"MFU {mfu}")


def _progress_postfix(loss: float, tokens_per_s: float, mfu: Optional[float]) -> dict:
    return {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}",
            "mfu": "n/a" if mfu is None else f"{100 * mfu:.1f}%"}


def train(args: argparse.Namespace, info: Optional[DistInfo] = None) -> TrainResult:
    """Run (or continue) training as ``args`` say. InputError for a bad argument or input,
    raised before the first step and before any file is written (the last check creates the
    --out folder and writes a probe file there); TrainingInterrupted on Ctrl-C."""
    info = info or dist_info_from_env()
    spec, ckpt = resolve_spec(args, info.world_size, info.local_rank)
    data = load_data(spec.data, spec.run["seq_len"])
    if ckpt is not None:
        check_resume(ckpt, data, info.world_size)
    if info.is_main:
        prepare_out_dir(spec.out)
    started_dist = info.world_size > 1 and not dist.is_initialized()
    if started_dist:
        if spec.device.type == "cuda":
            torch.cuda.set_device(spec.device)
        dist.init_process_group("nccl" if spec.device.type == "cuda" else "gloo")
    try:
        result = _train_loop(Trainer(spec, ckpt, data, info), spec, info)
        if started_dist:
            # Every rank done before any tears the group down: a gloo rank still tearing down
            # when its peer has closed their connections can abort (std::terminate).
            dist.barrier()
        return result
    finally:
        if started_dist:
            dist.destroy_process_group()


def _train_loop(trainer: Trainer, spec: RunSpec, info: DistInfo) -> TrainResult:
    run = spec.run
    path = os.path.join(spec.out, CHECKPOINT_NAME)
    if info.is_main:
        print(trainer.header(), flush=True)
    if trainer.step >= spec.stop_at:
        if info.is_main:
            print(f"nothing to do: the checkpoint is at step {trainer.step} (stop at "
                  f"{spec.stop_at})")
        return TrainResult(trainer.model, trainer.step, trainer.history, path)
    tokens_per_step = run["batch_size"] * run["seq_len"]
    bar = tqdm(total=run["steps"], initial=trainer.step, disable=not info.is_main,
               dynamic_ncols=True, desc="train")
    try:
        for step in range(trainer.step, spec.stop_at):
            t0 = time.perf_counter()
            loss = trainer.train_step(step)
            elapsed = time.perf_counter() - t0
            trainer.step = done = step + 1
            trainer.history["train"].append([done, loss])
            tokens_per_s = tokens_per_step / elapsed
            mfu = None if trainer.peak is None else (
                tokens_per_s * trainer.flops_per_token / info.world_size / trainer.peak)
            bar.set_postfix(_progress_postfix(loss, tokens_per_s, mfu), refresh=False)
            bar.update(1)
            _periodic(trainer, done, loss, path, bar, spec)
    except KeyboardInterrupt:
        raise TrainingInterrupted(trainer.step, run["steps"], trainer.saved_step, path) from None
    finally:
        bar.close()
    return TrainResult(trainer.model, trainer.step, trainer.history, path)


def _periodic(trainer: Trainer, done: int, loss: float, path: str, bar, spec: RunSpec) -> None:
    run, last = spec.run, done == spec.stop_at
    if done % run["eval_interval"] == 0 or done == run["steps"]:
        held_out = trainer.evaluate()
        trainer.history["eval"].append([done, held_out])
        if trainer.info.is_main:
            bar.write(f"step {done}: train loss {loss:.4f}, held-out loss {held_out:.4f}")
    if run["sample_interval"] and done % run["sample_interval"] == 0 and trainer.info.is_main:
        bar.write(f"--- sample at step {done} ---\n{trainer.sample(done)}\n---")
    if done % run["checkpoint_interval"] == 0 or last:
        trainer.save(path)


def save_loss_plot(history: dict, path: str) -> None:
    """Train and held-out loss against step, as a PNG written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if history["train"]:
        steps, losses = zip(*history["train"])
        ax.plot(steps, losses, lw=0.8, alpha=0.7, label="train")
    if history["eval"]:
        steps, losses = zip(*history["eval"])
        ax.plot(steps, losses, "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


# ----------------------------------------------------------------------------- commands

def _report(line: str, code: int) -> int:
    """Print line to stderr (on the main process) and return code."""
    if dist_info_from_env().is_main:
        print(line, file=sys.stderr)
    return code


def _error(message: str) -> int:
    return _report(f"error: {message}", 2)


def train_command(args: argparse.Namespace) -> int:
    """`train`: 0 on success, 2 with one `error:` line for a bad argument or input, 130 with
    one line on where to continue after Ctrl-C."""
    try:
        train(args)
    except (InputError, lk.BackendUnavailableError) as exc:
        return _error(str(exc).splitlines()[0])
    except TrainingInterrupted as exc:
        return _report(str(exc), 130)
    except KeyboardInterrupt:
        return _report("interrupted before the first step: this run wrote no checkpoint", 130)
    return 0


def checkpoint_file(path: str) -> str:
    """--checkpoint as a file: a train --out folder stands for the checkpoint in it."""
    if not os.path.isdir(path):
        return path
    inside = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(inside):
        raise InputError(f"--checkpoint {path!r} is a folder without a {CHECKPOINT_NAME}: give "
                         "a checkpoint file or a train --out folder")
    return inside


def _check_sampling_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise InputError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {args.top_k}")
    check_seed(args.seed)


def encode_prompt(prompt: str) -> list[int]:
    """The prompt's bytes (undecodable command-line bytes kept as they were)."""
    try:
        ids = ByteTokenizer().encode(prompt)
    except UnicodeEncodeError as exc:
        raise InputError(f"--prompt holds U+{ord(prompt[exc.start]):04X}, a lone surrogate "
                         "that is not text") from None
    if not ids:
        raise InputError("--prompt is empty")
    return ids


def new_token_count(requested: Optional[int], prompt_len: int, max_seq_len: int) -> int:
    """--max-new-tokens, or by default as many as fit after the prompt (at most
    DEFAULT_MAX_NEW_TOKENS); InputError when they do not fit."""
    room = max_seq_len - prompt_len
    if room < 1:
        raise InputError(f"the prompt ({prompt_len} bytes) leaves no room for new tokens in "
                         f"the model's max_seq_len {max_seq_len}")
    if requested is None:
        return min(DEFAULT_MAX_NEW_TOKENS, room)
    if requested > room:
        raise InputError(f"the prompt ({prompt_len} bytes) + --max-new-tokens {requested} "
                         f"exceeds the model's max_seq_len {max_seq_len}: at most {room} fit")
    return requested


def generate_text(args: argparse.Namespace) -> str:
    """The prompt and its continuation sampled from the checkpoint's model."""
    backend = resolve_backend(args.backend)
    device = resolve_device(args.device)
    _check_sampling_args(args)
    ids = encode_prompt(args.prompt)
    ckpt = load_checkpoint(checkpoint_file(args.checkpoint))
    model = model_from_checkpoint(ckpt, backend).to(device).eval()
    if not model.config.causal:
        raise InputError("the checkpoint is a masked-LM encoder: generate needs a causal LM")
    max_new_tokens = new_token_count(args.max_new_tokens, len(ids), model.config.max_seq_len)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        contextlib.nullcontext()
    with amp:
        out = model.generate(idx, max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, generator=generator)
    return ByteTokenizer().decode(out[0].tolist())


def generate_command(args: argparse.Namespace) -> int:
    """`generate`: prints the text; 2 with one `error:` line for a bad argument or input."""
    try:
        text = generate_text(args)
    except (InputError, lk.BackendUnavailableError) as exc:
        return _error(str(exc).splitlines()[0])
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A parser with just `train` and `generate` (``python -m llm_kernels.train``)."""
    parser = argparse.ArgumentParser(prog="python -m llm_kernels.train")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
