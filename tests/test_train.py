"""Training and generation CLI of the reference GPT: data, masked LM, schedule, checkpoints
and exact resume, bad input, multi-process (DDP on gloo) and convergence on tinyshakespeare."""
import collections
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from llm_kernels import train as T

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO_ROOT, "..", "shared", "data", "tinyshakespeare.txt")
TINY_MODEL = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--d-ff", "64"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: small models run faster so on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_text_file(folder) -> str:
    """About 6 KB of varied UTF-8 text (with multi-byte characters) in folder/text.txt."""
    gen = torch.Generator().manual_seed(1)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "naïve", "café",
             "to", "be", "or", "not", "that", "is", "question", "\n"]
    picks = torch.randint(0, len(words), (1200,), generator=gen).tolist()
    path = folder / "text.txt"
    path.write_text(" ".join(words[i] for i in picks), encoding="utf-8")
    return str(path)


@pytest.fixture
def text_file(tmp_path):
    return write_text_file(tmp_path)


def train_argv(data, out, *extra) -> list:
    return ["train", "--data", data, "--out", str(out), "--device", "cpu", "--backend", "torch",
            "--batch-size", "4", "--seq-len", "16", "--eval-interval", "4", "--eval-iters", "2",
            "--sample-interval", "0", "--checkpoint-interval", "4", *TINY_MODEL, *extra]


def train_args(data, out, *extra):
    return T.build_parser().parse_args(train_argv(data, out, *extra))


@pytest.fixture(scope="module")
def clm_checkpoint(tmp_path_factory) -> str:
    """A 3-step causal LM run (max_seq_len 16) shared by the generate tests; read only."""
    folder = tmp_path_factory.mktemp("clm")
    T.train(train_args(write_text_file(folder), folder / "run", "--steps", "3"))
    return str(folder / "run" / "ckpt.pt")


def run_cli(argv, capsys):
    code = T.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# ----------------------------------------------------------------------------- data

def test_byte_tokenizer_round_trip():
    tok = T.ByteTokenizer()
    text = "To be, or not — naïve café ☃"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([ord("a"), tok.mask_id, ord("b")]) == "a_b"
    assert tok.vocab_size == 257


def test_byte_tokenizer_keeps_undecodable_command_line_bytes():
    """Python decodes a non-UTF-8 argv byte b to the lone surrogate U+DC00 + b."""
    assert T.ByteTokenizer().encode(b"a\xff\xfe".decode("utf-8", "surrogateescape")) == \
        [97, 255, 254]
    with pytest.raises(UnicodeEncodeError):
        T.ByteTokenizer().encode("\ud800")


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"hello\x00world" * 100, "NUL"),
    (b"caf\xe9 latin-1 text " * 100, "not UTF-8"),
])
def test_load_tokens_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(T.InputError, match=match):
        T.load_tokens(str(path))


def test_split_is_90_10_and_needs_room_for_a_sequence():
    tokens = torch.arange(1000, dtype=torch.int64) % 256
    train, held = T.split_tokens(tokens, 64)
    assert len(train) == 900 and len(held) == 100
    assert torch.equal(torch.cat([train, held]), tokens)
    with pytest.raises(T.InputError, match="too small"):
        T.split_tokens(tokens, 100)


def test_batches_are_windows_seeded_by_seed_and_step():
    tokens = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    x, y = T.make_batch(tokens, 7, 33, "clm", T.seeded_generator(3, "train", 11))
    assert x.shape == y.shape == (7, 33) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = [next(s for s in range(5000 - 33) if torch.equal(tokens[s:s + 33].long(), row))
              for row in x]
    assert all(torch.equal(tokens[s + 1:s + 34].long(), y[i]) for i, s in enumerate(starts))
    x2, _ = T.make_batch(tokens, 7, 33, "clm", T.seeded_generator(3, "train", 11))
    x3, _ = T.make_batch(tokens, 7, 33, "clm", T.seeded_generator(3, "train", 12))
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_masked_lm_follows_the_bert_rule():
    """15% of positions selected per row; of those 80% [MASK], 10% random byte, 10% kept."""
    tokens = torch.randint(0, 256, (400, 97))
    inputs, targets = T.mask_tokens(tokens, torch.Generator().manual_seed(0))
    selected = targets != -100
    assert torch.all(selected.sum(1) == round(0.15 * 97))
    assert torch.equal(targets[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])
    n = selected.sum().item()
    masked = (inputs[selected] == T.ByteTokenizer.mask_id).float().mean().item()
    kept = (inputs[selected] == tokens[selected]).float().mean().item()
    replaced = 1 - masked - kept
    # 6000 selected: 3 standard deviations of a 10% share are 0.012.
    assert n == 400 * 15
    assert abs(masked - 0.8) < 0.02 and abs(replaced - 0.1 * 255 / 256) < 0.015
    assert abs(kept - (0.1 + 0.1 / 256)) < 0.015
    assert inputs.max() <= T.ByteTokenizer.mask_id


def test_learning_rate_warmup_then_cosine():
    run = {"lr": 1e-3, "min_lr": 1e-4, "warmup": 10, "steps": 110}
    lrs = [T.learning_rate(s, run) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert T.learning_rate(110, run) == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, text_file, objective):
    """N steps straight == N/2 steps, stop, --resume for the rest: same losses bit for bit
    (dropout on, so the restored RNG state matters) and the same final weights."""
    common = ("--steps", "8", "--dropout", "0.1", "--objective", objective)
    straight = T.train(train_args(text_file, tmp_path / "a", *common))
    first = T.train(train_args(text_file, tmp_path / "b", *common, "--stop-at", "4"))
    assert first.step == 4 and len(first.history["train"]) == 4
    resumed = T.train(train_args(text_file, tmp_path / "b", "--resume"))
    assert resumed.step == 8
    assert [loss for _, loss in resumed.history["train"]] == \
        [loss for _, loss in straight.history["train"]]
    assert resumed.history["eval"] == straight.history["eval"]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(),
                                 resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_holds_the_whole_run_state(tmp_path, text_file):
    out = tmp_path / "run"
    T.train(train_args(text_file, out, "--steps", "5"))
    assert sorted(os.listdir(out)) == ["ckpt.pt", "loss.png"]  # no temp files left
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = T.load_checkpoint(str(out / "ckpt.pt"), for_resume=True)
    assert ckpt["step"] == 5 and ckpt["config"]["n_layer"] == 2
    assert ckpt["run"]["seed"] == 1337 and ckpt["data"]["bytes"] == os.path.getsize(text_file)
    assert set(ckpt["rng"][0]) == {"torch", "numpy", "python"}
    assert [s for s, _ in ckpt["history"]["train"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in ckpt["history"]["eval"]] == [4, 5]
    assert ckpt["optimizer"]["state"] and ckpt["model"].keys() == T.GPT(
        T.GPTConfig(**ckpt["config"])).state_dict().keys()


def test_resume_derives_an_unset_min_lr_and_warmup_again(tmp_path, text_file):
    """min_lr (lr / 10) and warmup (steps / 10) that were never given follow a new --lr and
    --steps on --resume; a given --min-lr is kept."""
    derived, given = tmp_path / "derived", tmp_path / "given"
    T.train(train_args(text_file, derived, "--steps", "20", "--lr", "1e-3", "--stop-at", "1"))
    T.train(train_args(text_file, given, "--steps", "20", "--lr", "1e-3", "--min-lr", "2e-4",
                       "--stop-at", "1"))
    assert T.load_checkpoint(str(derived / "ckpt.pt"))["derived"] == ["min_lr", "warmup"]
    same, _ = T.resolve_spec(train_args(text_file, derived, "--resume"))
    assert same.run["min_lr"] == 1e-4 and same.run["warmup"] == 2
    spec, _ = T.resolve_spec(train_args(text_file, derived, "--resume", "--lr", "5e-5",
                                        "--steps", "40"))
    assert spec.run["min_lr"] == pytest.approx(5e-6) and spec.run["warmup"] == 4
    assert spec.derived == ("min_lr", "warmup")
    spec, _ = T.resolve_spec(train_args(text_file, given, "--resume", "--lr", "5e-4"))
    assert spec.run["min_lr"] == 2e-4 and spec.derived == ("warmup",)


def test_atomic_write_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous complete checkpoint")

    def fails_half_way(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        T.atomic_write(str(path), fails_half_way)
    assert path.read_bytes() == b"previous complete checkpoint"
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    T.atomic_write(str(path), lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- bad input

def _prepare_bad_case(case, tmp_path, text_file):
    """(argv, folder that must stay unchanged) for one bad-input case."""
    out = tmp_path / "out"
    base = ["train", "--data", text_file, "--out", str(out), "--device", "cpu", "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", *TINY_MODEL]
    if case in ("corrupt checkpoint", "mismatched checkpoint", "checkpoint without --resume",
                "other data on --resume"):
        assert T.main(base) == 0
    if case == "missing data":
        return ["train", "--data", str(tmp_path / "nope.txt"), "--out", str(out)], tmp_path
    if case in ("empty data", "binary data", "invalid utf-8"):
        content = {"empty data": b"", "binary data": b"\x00\x01\x02" * 500,
                   "invalid utf-8": b"\xff\xfe text " * 500}[case]
        (tmp_path / "bad.txt").write_bytes(content)
        return ["train", "--data", str(tmp_path / "bad.txt"), "--out", str(out)], tmp_path
    if case == "seq-len above max-seq-len":
        return base + ["--max-seq-len", "8"], tmp_path
    if case == "unknown backend":
        return base + ["--backend", "tpu"], tmp_path
    if case == "out is a file":
        (tmp_path / "file").write_text("keep me")
        return ["train", "--data", text_file, "--out", str(tmp_path / "file")], tmp_path
    if case == "out below a file":
        (tmp_path / "file").write_text("keep me")
        return base[:4] + [str(tmp_path / "file" / "run")] + base[5:], tmp_path
    if case == "out not writable":
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        if os.geteuid() == 0:  # root writes into a 0o500 folder; nobody creates one in /proc
            locked = "/proc/llm-kernels-out"
        return base[:4] + [str(locked)] + base[5:], tmp_path
    if case == "seed out of range":
        return base + ["--seed", str(2**64)], tmp_path
    if case == "corrupt checkpoint":
        ckpt = out / "ckpt.pt"
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
        return base + ["--resume"], tmp_path
    if case == "mismatched checkpoint":
        return base + ["--resume", "--d-model", "64"], tmp_path
    if case == "checkpoint without --resume":
        return base, tmp_path
    if case == "other data on --resume":
        other = tmp_path / "other.txt"
        other.write_text(open(text_file, encoding="utf-8").read()[::-1], encoding="utf-8")
        return ["train", "--data", str(other), "--out", str(out), "--resume"], tmp_path
    if case == "resume without checkpoint":
        return base + ["--resume"], tmp_path
    if case == "data too small":
        (tmp_path / "small.txt").write_text("tiny text")
        return ["train", "--data", str(tmp_path / "small.txt"), "--out", str(out)], tmp_path
    if case == "bad model shape":
        return base + ["--d-model", "30", "--n-head", "4"], tmp_path
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing data", "empty data", "binary data", "invalid utf-8", "seq-len above max-seq-len",
    "unknown backend", "out is a file", "out below a file", "out not writable",
    "seed out of range", "corrupt checkpoint", "mismatched checkpoint",
    "checkpoint without --resume", "other data on --resume", "resume without checkpoint",
    "data too small", "bad model shape",
])
def test_bad_input_gives_one_error_line_exit_2_and_writes_nothing(case, tmp_path, text_file,
                                                                   capsys):
    argv, folder = _prepare_bad_case(case, tmp_path, text_file)
    capsys.readouterr()
    before = snapshot(folder)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (case, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert snapshot(folder) == before


@pytest.mark.parametrize("extra, message", [
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number >= 0, got inf"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr 0.01 must be <= --lr 0.001"),
    (["--seed", str(-2**63 - 1)], "--seed must be between -9223372036854775808 and "),
])
def test_run_arguments_are_reported_by_the_flag_given(tmp_path, text_file, capsys, extra,
                                                      message):
    code, _, err = run_cli(train_argv(text_file, tmp_path / "out", *extra), capsys)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_unwritable_out_is_reported_before_training(tmp_path, text_file, capsys):
    (tmp_path / "file").write_text("keep me")
    code, out, err = run_cli(train_argv(text_file, tmp_path / "file" / "run"), capsys)
    assert code == 2 and out == ""  # not even the header: no step ran
    assert err == f"error: cannot write to --out {str(tmp_path / 'file' / 'run')!r}: " \
                  "Not a directory\n"


def test_weights_mismatch_names_the_first_bad_entries():
    model = T.GPT(T.GPTConfig(vocab_size=257, n_layer=1, n_head=2, n_kv_head=2, d_model=16,
                              d_ff=32, max_seq_len=8))
    weights = model.state_dict()
    assert T.weights_mismatch(model, weights) is None
    weights["wte.weight"] = torch.zeros(257, 8)
    weights["extra"] = torch.zeros(1)
    del weights["norm_f.weight"], weights["norm_f.bias"]
    assert T.weights_mismatch(model, weights) == (
        "missing norm_f.weight (and 1 more); unexpected extra; "
        "wte.weight is (257, 8) where the model has (257, 16)")
    assert T.weights_mismatch(model, [1]) == "the weights are a list, not a state dict"


def test_resume_reports_weights_that_do_not_fit(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    T.train(train_args(text_file, out, "--steps", "2"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["model"]["norm_f.bias"]
    torch.save(ckpt, out / "ckpt.pt")
    capsys.readouterr()
    code, _, err = run_cli(train_argv(text_file, out, "--resume", "--steps", "4"), capsys)
    assert code == 2
    assert err == "error: the checkpoint does not fit this model: missing norm_f.bias\n"


def test_one_line_keeps_the_line_a_header_introduces():
    exc = RuntimeError("Error(s) in loading state_dict for GPT:\n\tMissing key(s): \"a\".\n\tmore")
    assert T._one_line(exc) == 'RuntimeError: Error(s) in loading state_dict for GPT: ' \
                               'Missing key(s): "a".'
    assert T._one_line(ValueError("x" * 500)) == f"ValueError: {'x' * 197}..."


def test_argparse_errors_exit_2(text_file, capsys):
    with pytest.raises(SystemExit) as info:
        T.main(["train", "--data", text_file, "--steps", "many"])
    assert info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Ctrl-C

def interrupt_at(monkeypatch, at_step: int) -> None:
    """Make Trainer.train_step raise KeyboardInterrupt (as Ctrl-C does) at step at_step."""
    real_step = T.Trainer.train_step

    def train_step(self, step):
        if step == at_step:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(T.Trainer, "train_step", train_step)


def test_ctrl_c_names_the_last_checkpoint_and_resume_continues(tmp_path, text_file, capsys,
                                                               monkeypatch):
    out = tmp_path / "run"
    ckpt = out / "ckpt.pt"
    interrupt_at(monkeypatch, 6)
    code, _, err = run_cli(train_argv(text_file, out, "--steps", "8"), capsys)
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"interrupted after step 6 of 8: the last checkpoint, "
                                    f"{ckpt}, is at step 4; --resume continues from there")
    assert T.load_checkpoint(str(ckpt), for_resume=True)["step"] == 4
    interrupt_at(monkeypatch, 5)
    code, _, err = run_cli(train_argv(text_file, out, "--resume"), capsys)
    assert code == 130 and "the last checkpoint" in err and "is at step 4;" in err
    monkeypatch.undo()
    assert T.train(train_args(text_file, out, "--resume")).step == 8


def test_ctrl_c_before_any_checkpoint(tmp_path, text_file, capsys, monkeypatch):
    interrupt_at(monkeypatch, 2)
    code, _, err = run_cli(train_argv(text_file, tmp_path / "run", "--steps", "8"), capsys)
    assert code == 130 and err.splitlines()[-1] == (
        "interrupted after step 2 of 8: no checkpoint was written yet, so a new run starts "
        "from step 0")

    def interrupted_load(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "load_data", interrupted_load)
    code, _, err = run_cli(train_argv(text_file, tmp_path / "other"), capsys)
    assert code == 130
    assert err == "interrupted before the first step: this run wrote no checkpoint\n"


# ----------------------------------------------------------------------------- generate

def test_generate_cli(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    T.train(train_args(text_file, out, "--steps", "3"))
    capsys.readouterr()
    ckpt = str(out / "ckpt.pt")
    argv = ["generate", "--checkpoint", ckpt, "--prompt", "the quick", "--max-new-tokens", "5",
            "--temperature", "0", "--device", "cpu"]
    code, text, err = run_cli(argv, capsys)
    assert code == 0, err
    assert text.startswith("the quick")
    assert len(text[:-1]) > len("the quick")
    assert run_cli(argv, capsys)[1] == text  # greedy is deterministic
    sampled = run_cli(argv[:-4] + ["--temperature", "1.0", "--top-k", "5", "--seed", "3"], capsys)
    assert sampled[0] == 0 and sampled[1] == run_cli(
        argv[:-4] + ["--temperature", "1.0", "--top-k", "5", "--seed", "3"], capsys)[1]
    too_long = run_cli(argv[:-4] + ["--max-new-tokens", "200"], capsys)
    assert too_long[0] == 2 and "max_seq_len" in too_long[2] and too_long[2].count("\n") == 1
    empty = run_cli(["generate", "--checkpoint", ckpt, "--prompt", ""], capsys)
    assert empty[0] == 2 and "empty" in empty[2]
    missing = run_cli(["generate", "--checkpoint", str(tmp_path / "x.pt"), "--prompt", "a"], capsys)
    assert missing[0] == 2 and "does not exist" in missing[2]


def generate_argv(checkpoint, *extra) -> list:
    return ["generate", "--checkpoint", checkpoint, "--device", "cpu", "--backend", "torch",
            *extra]


def test_generate_by_default_fills_the_room_the_model_leaves(clm_checkpoint, capsys):
    """README's example: max_seq_len 16 (= --seq-len), no --max-new-tokens."""
    code, text, err = run_cli(generate_argv(clm_checkpoint, "--prompt", "ROMEO:"), capsys)
    assert code == 0 and text.startswith("ROMEO:"), err
    assert T.new_token_count(None, 6, 16) == 10 and T.new_token_count(None, 6, 1024) == 200
    assert T.new_token_count(7, 6, 16) == 7
    code, _, err = run_cli(generate_argv(clm_checkpoint, "--prompt", "x" * 16), capsys)
    assert code == 2 and "leaves no room" in err and err.count("\n") == 1
    code, _, err = run_cli(generate_argv(clm_checkpoint, "--prompt", "ROMEO:",
                                         "--max-new-tokens", "11"), capsys)
    assert code == 2 and err.endswith("max_seq_len 16: at most 10 fit\n")


def test_generate_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        T.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0
    for default in ("at most 200)", "(default: 0.8)", "(default: 0)", "(default: all)"):
        assert default in help_text


def test_generate_takes_the_run_folder(clm_checkpoint, tmp_path, capsys):
    argv = ["--prompt", "the", "--temperature", "0", "--max-new-tokens", "4"]
    by_file = run_cli(generate_argv(clm_checkpoint, *argv), capsys)
    by_folder = run_cli(generate_argv(os.path.dirname(clm_checkpoint), *argv), capsys)
    assert by_file[0] == by_folder[0] == 0 and by_file[1] == by_folder[1]
    code, _, err = run_cli(generate_argv(str(tmp_path), *argv), capsys)
    assert code == 2 and "is a folder without a ckpt.pt" in err


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
    (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--seed", str(2**64)], "--seed must be between"),
    (["--prompt", "a\ud800"], "--prompt holds U+D800"),
])
def test_generate_bad_sampling_arguments(clm_checkpoint, capsys, extra, message):
    code, _, err = run_cli(generate_argv(clm_checkpoint, "--prompt", "the", *extra), capsys)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_generate_tiny_temperature_is_greedy(clm_checkpoint, capsys):
    argv = generate_argv(clm_checkpoint, "--prompt", "the", "--max-new-tokens", "8")
    greedy = run_cli(argv + ["--temperature", "0"], capsys)
    assert greedy[0] == 0, greedy[2]
    for tiny in ("1e-38", "1e-45"):
        assert run_cli(argv + ["--temperature", tiny], capsys) == greedy


def test_generate_takes_undecodable_prompt_bytes(clm_checkpoint, capsys):
    """`--prompt $'\\xff\\xfe'` reaches Python as surrogate escapes: the raw bytes are the
    prompt's tokens."""
    prompt = b"\xff\xfe".decode("utf-8", "surrogateescape")
    code, text, err = run_cli(generate_argv(clm_checkpoint, "--prompt", prompt,
                                            "--max-new-tokens", "3"), capsys)
    assert code == 0 and text.startswith("\ufffd\ufffd"), err


def test_generate_reports_weights_that_do_not_fit(clm_checkpoint, tmp_path, capsys):
    ckpt = torch.load(clm_checkpoint, weights_only=True)
    ckpt["model"]["wte.weight"] = torch.zeros(257, 16)
    torch.save(ckpt, tmp_path / "bad.pt")
    code, _, err = run_cli(generate_argv(str(tmp_path / "bad.pt"), "--prompt", "a"), capsys)
    assert code == 2 and err == ("error: the checkpoint's weights do not fit its config: "
                                 "wte.weight is (257, 16) where the model has (257, 32)\n")


def test_generate_refuses_a_masked_lm_checkpoint(tmp_path, text_file, capsys):
    out = tmp_path / "mlm"
    T.train(train_args(text_file, out, "--steps", "2", "--objective", "mlm"))
    code, _, err = run_cli(["generate", "--checkpoint", str(out / "ckpt.pt"), "--prompt", "a"],
                           capsys)
    assert code == 2 and "masked-LM" in err


# ----------------------------------------------------------------------------- multi-process

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path, text_file):
    """2 CPU processes (gloo), each half of the global batch: the ranks' parameters stay
    identical and the per-step loss equals a single process's on the same global batch."""
    argv = ["train", "--data", text_file, "--device", "cpu", "--backend", "torch", "--steps", "4",
            "--batch-size", "4", "--seq-len", "16", "--eval-interval", "4", "--eval-iters", "1",
            "--sample-interval", "0", "--checkpoint-interval", "4", *TINY_MODEL]
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO_ROOT, "tests", "ddp_worker.py"), str(tmp_path),
             *argv, "--out", str(tmp_path / "ddp")], env=env, cwd=REPO_ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    single = T.train(T.build_parser().parse_args(argv + ["--out", str(tmp_path / "single")]))
    ddp_losses = [loss for _, loss in ranks[0]["losses"]]
    single_losses = [loss for _, loss in single.history["train"]]
    assert len(ddp_losses) == len(single_losses) == 4
    for step, (a, b) in enumerate(zip(ddp_losses, single_losses)):
        assert abs(a - b) / abs(b) < 1e-5, (step, a, b)
    assert sorted(os.listdir(tmp_path / "ddp")) == ["ckpt.pt", "loss.png"]
    assert len(T.load_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"), True)["rng"]) == 2


# ----------------------------------------------------------------------------- convergence

def unigram_entropy(path) -> float:
    """Entropy in nats per byte of the file's byte frequencies."""
    with open(path, "rb") as f:
        counts = collections.Counter(f.read())
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


@pytest.mark.slow
def test_converges_on_tinyshakespeare(tmp_path):
    """4 layers, d 128, 250 steps of 16 x 64 bytes on the CPU: the held-out loss ends well
    below the unigram entropy of the text (a model that ignores context cannot beat it)."""
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} is absent")
    start = time.perf_counter()
    args = T.build_parser().parse_args([
        "train", "--data", SHAKESPEARE, "--out", str(tmp_path), "--device", "cpu",
        "--backend", "torch", "--steps", "250", "--batch-size", "16", "--seq-len", "64",
        "--lr", "3e-3", "--warmup", "20", "--eval-interval", "250", "--eval-iters", "10",
        "--sample-interval", "0", "--checkpoint-interval", "250", "--n-layer", "4",
        "--n-head", "4", "--d-model", "128"])
    result = T.train(args)
    held_out = result.history["eval"][-1][1]
    entropy = unigram_entropy(SHAKESPEARE)
    print(f"unigram entropy {entropy:.4f} nats, held-out loss {held_out:.4f} after "
          f"{result.step} steps, {time.perf_counter() - start:.0f} s")
    assert held_out < entropy - 0.6


# ----------------------------------------------------------------------------- GPU

@pytest.mark.cuda
def test_gpu_training_bf16_autocast(tmp_path, text_file, capsys):
    """The default GPU run (bf16 autocast, backend auto): the loss falls, MFU is reported
    on an H100/H200, and the checkpoint generates text."""
    out = tmp_path / "gpu"
    code = T.main(["train", "--data", text_file, "--out", str(out), "--steps", "60",
                   "--batch-size", "16", "--seq-len", "128", "--eval-interval", "30",
                   "--eval-iters", "4", "--sample-interval", "60", "--checkpoint-interval", "60",
                   "--lr", "3e-3", "--warmup", "5", "--n-layer", "2", "--d-model", "128"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    ckpt = T.load_checkpoint(str(out / "ckpt.pt"), for_resume=True)
    losses = [loss for _, loss in ckpt["history"]["train"]]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert "bf16 autocast" in captured.out
    if any(k in torch.cuda.get_device_name() for k in ("H100", "H200")):
        assert "mfu=" in captured.err and "mfu=n/a" not in captured.err
    code = T.main(["generate", "--checkpoint", str(out / "ckpt.pt"), "--prompt", "the",
                   "--max-new-tokens", "20"])
    assert code == 0 and capsys.readouterr().out.startswith("the")
