"""Calibrated auto-selection (mmkernels._calibration): deterministic, never a wall-clock timing.

The clock is a fake that only the fake contenders advance (each "runs" for a fixed number of
milliseconds), so the winner is known; the cache directory is the test's tmp_path.
"""

import collections
import json

import pytest
import torch

import mmkernels
from mmkernels import _calibration, _dispatch, _extension, cli
from mmkernels.attention import backends as attention_backends
from mmkernels.attention.api import describe_call
from mmkernels.quant import backends as quant_backends
from mmkernels.quant.api import QMatmulCall

from backend_params import attention_call


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch, tmp_path):
    """Calibration on, a fake clock, the decision file under tmp_path, nothing remembered."""
    fake = Clock()
    monkeypatch.setattr(_calibration, "_clock", fake)
    monkeypatch.setenv("MMKERNELS_CALIBRATE", "1")
    monkeypatch.setenv("MMKERNELS_CACHE_DIR", str(tmp_path))
    _calibration.clear()
    yield fake
    _calibration.clear()


class Contenders:
    """A factory of fake contenders taking ``ms[name]`` milliseconds each; counts what ran."""

    def __init__(self, clock, ms, fail=()):
        self.clock, self.ms, self.fail = clock, dict(ms), set(fail)
        self.made = 0
        self.runs = collections.Counter()

    def __call__(self, *_call):
        self.made += 1
        return {name: self._run(name) for name in self.ms}

    def _run(self, name):
        def run():
            self.runs[name] += 1
            if name in self.fail:
                raise RuntimeError(f"{name} broke")
            self.clock.now += self.ms[name] / 1e3

        return run


def _never(*_call):
    raise AssertionError("calibrated again: the decision should have come from a cache")


# --- the decision ------------------------------------------------------------------------------


def test_the_faster_contender_wins_once_per_bucket_per_process(clock):
    make = Contenders(clock, {"cpu": 1.0, "torch": 2.0})
    d = _calibration.decide("attention", "bucket A", make)
    assert d.winner == "cpu" and d.times_ms == {"cpu": 1.0, "torch": 2.0}
    assert d.why == "calibrated on this machine: cpu 1 ms vs torch 2 ms for bucket A"
    assert make.runs["cpu"] == make.runs["torch"] >= 1 + _calibration.MIN_ROUNDS  # warm-up + rounds
    assert make.runs["cpu"] <= 1 + _calibration.MAX_ROUNDS
    runs = dict(make.runs)
    assert _calibration.decide("attention", "bucket A", make) == d
    assert make.made == 1 and dict(make.runs) == runs
    # another bucket is another decision
    assert _calibration.decide("attention", "bucket B", Contenders(clock, {"cpu": 3.0, "torch": 2.0})).winner == "torch"


def test_a_tie_goes_to_the_preferred_contender(clock):
    assert _calibration.decide("op", "near", Contenders(clock, {"cpu": 1.0, "torch": 1.04})).winner == "torch"
    d = _calibration.decide("op", "near, cpu preferred", Contenders(clock, {"cpu": 1.04, "torch": 1.0}), prefer="cpu")
    assert d.winner == "cpu" and "within 5%: cpu, the safe choice" in d.why
    assert _calibration.decide("op", "far", Contenders(clock, {"cpu": 1.0, "torch": 1.2})).winner == "cpu"


def test_slow_contenders_stop_at_the_hard_cap(clock):
    make = Contenders(clock, {"cpu": 400.0, "torch": 300.0})
    assert _calibration.decide("op", "slow", make).winner == "torch"
    assert make.runs["cpu"] == 2  # warm-up + one round: 1.4 s spent, past HARD_CAP_S


def test_a_failing_contender_drops_out(clock):
    d = _calibration.decide("op", "b", Contenders(clock, {"cpu": 1.0, "torch": 2.0}, fail={"cpu"}))
    assert d.winner == "torch" and "failed: cpu: RuntimeError: cpu broke" in d.why
    assert _calibration.decide("op", "c", Contenders(clock, {"cpu": 1.0, "torch": 2.0}, fail={"cpu", "torch"})) is None


def test_size_buckets_are_powers_of_two_capped():
    assert [_calibration.size_bucket(n) for n in (0, 1, 2, 3, 197, 256, 257, 5000)] == [1, 1, 2, 4, 256, 256, 512, 4096]
    assert _calibration.size_bucket(300, cap=256) == 256


# --- the file ----------------------------------------------------------------------------------


def test_decisions_persist_in_the_machine_file_and_reload(clock, tmp_path):
    d = _calibration.decide("qmatmul", "float32, M~16, K=64, N=32", Contenders(clock, {"cpu": 2.0, "torch": 1.0}))
    path = _calibration.cache_file()
    assert path.parent == tmp_path and path.name.startswith("calibration-")
    data = json.loads(path.read_text())
    assert data["format"] == _calibration.FORMAT and data["fingerprint"] == _calibration.fingerprint()
    assert data["decisions"]["qmatmul: float32, M~16, K=64, N=32"]["winner"] == "torch"
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left behind
    _calibration.clear()  # a new process
    assert _calibration.decide("qmatmul", "float32, M~16, K=64, N=32", _never) == d
    assert _calibration.cached() == [d]


def test_the_file_is_per_fingerprint(clock, monkeypatch):
    here = _calibration.cache_file()
    fp = _calibration.fingerprint()
    assert {"cpu", "vendor", "flags", "cores", "threads", "torch", "mmkernels", "isa"} <= set(fp)
    monkeypatch.setattr(torch, "get_num_threads", lambda: fp["threads"] + 1)
    assert _calibration.cache_file() != here


def _valid_file_text(fp, winner="torch"):
    entry = {"op": "op", "bucket": "b", "winner": winner, "times_ms": {"cpu": 9.0, "torch": 1.0}, "why": "stored"}
    return json.dumps({"format": _calibration.FORMAT, "fingerprint": fp, "decisions": {"op: b": entry}})


BAD_FILES = {
    "empty": lambda fp: "",
    "not json": lambda fp: "{this is not json",
    "truncated": lambda fp: _valid_file_text(fp)[:60],
    "a list": lambda fp: "[1, 2]",
    "wrong format": lambda fp: _valid_file_text(fp).replace('"format": 1', '"format": 999'),
    "wrong fingerprint": lambda fp: _valid_file_text({**fp, "cpu": "another CPU"}),
    "entry without times": lambda fp: _valid_file_text(fp).replace('"times_ms"', '"times"'),
    "winner not timed": lambda fp: _valid_file_text(fp, winner="triton"),
    "decisions not a dict": lambda fp: json.dumps({"format": 1, "fingerprint": fp, "decisions": [1]}),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_file_is_ignored_and_rewritten(clock, kind):
    path = _calibration.cache_file()
    path.write_text(BAD_FILES[kind](_calibration.fingerprint()))
    make = Contenders(clock, {"cpu": 1.0, "torch": 2.0})
    d = _calibration.decide("op", "b", make)
    assert make.made == 1 and d.winner == "cpu"  # the file's "torch" was not believed
    data = json.loads(path.read_text())
    assert data["fingerprint"] == _calibration.fingerprint()
    assert data["decisions"]["op: b"]["winner"] == "cpu"


def test_a_valid_file_is_believed(clock):
    _calibration.cache_file().write_text(_valid_file_text(_calibration.fingerprint()))
    d = _calibration.decide("op", "b", _never)
    assert d.winner == "torch" and d.why == "stored"


def test_an_unwritable_directory_keeps_decisions_in_memory(clock, monkeypatch, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("MMKERNELS_CACHE_DIR", str(blocker / "cache"))  # mkdir fails, even as root
    make = Contenders(clock, {"cpu": 1.0, "torch": 2.0})
    assert _calibration.decide("op", "b", make).winner == "cpu"
    assert _calibration.decide("op", "b", make).winner == "cpu" and make.made == 1
    assert "Error" in _calibration.write_error()
    assert [d.bucket for d in _calibration.cached()] == ["b"]
    assert any("not writable" in line for line in cli.calibration_lines())


# --- when it runs ------------------------------------------------------------------------------


def test_calibrate_0_turns_it_off(clock, monkeypatch):
    monkeypatch.setenv("MMKERNELS_CALIBRATE", "0")
    assert _calibration.decide("op", "b", _never) is None
    assert _calibration.setting() == (False, "off (MMKERNELS_CALIBRATE=0): the CPU-class rules decide")


@pytest.mark.parametrize(
    "klass, vendor, on",
    [("avx512", "amd", False), ("avx512", "intel", True), ("amx", "intel", True), ("avx2", "amd", True)],
)
def test_by_default_it_runs_where_the_class_rule_is_unmeasured(monkeypatch, klass, vendor, on):
    monkeypatch.delenv("MMKERNELS_CALIBRATE")
    monkeypatch.setattr(_extension, "_CPU_CLASS", klass)
    monkeypatch.setattr(_extension, "cpu_vendor", lambda: vendor)
    assert _calibration.setting()[0] is on
    monkeypatch.setenv("MMKERNELS_CALIBRATE", "1")
    assert _calibration.setting() == (True, "on (MMKERNELS_CALIBRATE=1)")


def test_never_while_compiling_or_under_fake_tensors(clock, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert _calibration.decide("op", "b", _never) is None
        q = torch.empty(2, 4, 16, 32)
        assert describe_call(q, q, q, False, None, False, None, False).bucket is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _calibration.decide("op", "b", _never) is None


# --- the torch backends' auto rules on a forced AMX class ----------------------------------------

CPU_OK = attention_backends.CPU.availability()[0]
QCPU_OK = quant_backends.CPU.availability()[0]


def _attn(dtype="bfloat16", bucket=(256, 256, 128), **kw):
    return attention_call(dtype, bucket=bucket, **kw)


@pytest.fixture
def amx(clock, monkeypatch, cpu_class):
    """A forced "amx" class with calibration at its default (on there)."""
    monkeypatch.delenv("MMKERNELS_CALIBRATE")
    cpu_class("amx")
    return clock


@pytest.mark.skipif(not CPU_OK, reason="calibration compares with the cpu backend")
def test_attention_on_amx_takes_the_calibrated_winner(amx, monkeypatch):
    make = Contenders(amx, {"cpu": 1.9, "torch": 2.4})
    monkeypatch.setattr(attention_backends, "_calibration_contenders", make)
    call = _attn()
    assert _dispatch.select("attention", call, "cpu").name == "cpu"
    assert _dispatch.select("attention", call, "cpu").name == "cpu" and make.made == 1
    chosen, trail = _dispatch.auto_choice("attention", call, "cpu")
    assert chosen.name == "cpu"
    assert dict(trail)["torch"] == (
        "can run it, but auto-selection passes it over here: calibrated on this machine: cpu 1.9 ms "
        "vs torch 2.4 ms for bfloat16, D=64, Lq~256, Lk~256, B*H~128"
    )
    # another bucket where torch is faster; GQA, key_bias and lse are part of the bucket
    make.ms = {"cpu": 3.0, "torch": 1.0}
    other = _attn(bucket=(1024, 1024, 16), num_heads_kv=4, has_bias=True, return_lse=True)
    assert _dispatch.select("attention", other, "cpu").name == "torch" and make.made == 2
    assert _calibration.cached()[0].bucket == "bfloat16, D=64, Lq~1024, Lk~1024, B*H~16, GQA 3:1, key_bias, lse"
    # no sizes (a call described while tracing): the AMX class rule
    assert _dispatch.select("attention", _attn(bucket=None), "cpu").name == "torch" and make.made == 2


@pytest.mark.skipif(not CPU_OK, reason="calibration compares with the cpu backend")
def test_attention_calls_one_backend_cannot_take_are_never_calibrated(amx, monkeypatch):
    monkeypatch.setattr(attention_backends, "_calibration_contenders", _never)
    assert _dispatch.select("attention", _attn(head_dim=36, head_dim_v=36), "cpu").name == "torch"  # not ours
    for kw in ({"causal": True}, {"scores": "mean"}, {"head_dim_v": 32}):  # not torch's
        assert _dispatch.select("attention", _attn(**kw), "cpu").name == "cpu", kw


@pytest.mark.skipif(not CPU_OK, reason="calibration compares with the cpu backend")
def test_a_real_attention_call_calibrates_its_own_bucket(amx, monkeypatch):
    monkeypatch.setattr(attention_backends, "_calibration_contenders", Contenders(amx, {"cpu": 1.0, "torch": 5.0}))
    q, k, v = (torch.randn(2, 3, 10, 16) for _ in range(3))
    torch.testing.assert_close(mmkernels.attention(q, k, v), mmkernels.attention(q, k, v, backend="reference"))
    [d] = _calibration.cached()
    assert (d.op, d.bucket, d.winner) == ("attention", "float32, D=16, Lq~16, Lk~16, B*H~8", "cpu")
    text = "\n".join(cli.calibration_lines())
    assert "calibration: on (our AMX tile kernels never ran against oneDNN on AMX hardware)" in text
    assert str(_calibration.cache_file()) in text
    assert "attention [float32, D=16, Lq~16, Lk~16, B*H~8] -> cpu (cpu 1 ms, torch 5 ms)" in text


@pytest.mark.skipif(not QCPU_OK, reason="calibration compares with the cpu backend")
def test_qmatmul_on_amx_takes_the_calibrated_winner(amx, monkeypatch):
    make = Contenders(amx, {"cpu": 2.0, "torch": 1.0})
    monkeypatch.setattr(quant_backends, "_calibration_contenders", make)
    call = QMatmulCall("cpu", "bfloat16", 8, 0, False, 8, True, False, (64, 768, 3072))
    assert _dispatch.select("qmatmul", call, "cpu").name == "torch"
    assert _dispatch.select("qmatmul", call, "cpu").name == "torch" and make.made == 1
    assert _calibration.cached()[0].bucket == "bfloat16, M~64, K=768, N=3072, asym, smooth"
    make.ms = {"cpu": 1.0, "torch": 2.0}
    faster_here = call._replace(bucket=(1, 768, 3072))
    chosen, trail = _dispatch.auto_choice("qmatmul", faster_here, "cpu")
    assert chosen.name == "cpu" and "calibrated on this machine: cpu 1 ms vs torch 2 ms" in dict(trail)["torch"]
    # weight-only (torch cannot) and float16 (ours cannot) calls never calibrate
    monkeypatch.setattr(quant_backends, "_calibration_contenders", _never)
    assert _dispatch.select("qmatmul", QMatmulCall("cpu", "bfloat16", 4, 128, True, 0, False), "cpu").name == "cpu"
    f16 = QMatmulCall("cpu", "float16", 8, 0, True, 8, False, False, (64, 768, 3072))
    if quant_backends.CPU.reasons(f16):
        assert _dispatch.select("qmatmul", f16, "cpu").name == "torch"


@pytest.mark.skipif(not QCPU_OK, reason="calibration compares with the cpu backend")
def test_a_real_qmatmul_call_calibrates_its_own_bucket(amx, monkeypatch):
    monkeypatch.setattr(quant_backends, "_calibration_contenders", Contenders(amx, {"cpu": 1.0, "torch": 5.0}))
    qw = mmkernels.quantize_weight(torch.randn(32, 64), 8)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(
        mmkernels.qmatmul(x, qw, act_bits=8), mmkernels.qmatmul(x, qw, act_bits=8, backend="reference")
    )
    assert [(d.op, d.bucket, d.winner) for d in _calibration.cached()] == [
        ("qmatmul", "float32, M~16, K=64, N=32", "cpu")
    ]


# --- the synthetic problems (run, never timed here) ----------------------------------------------


def test_synthetic_problems_keep_the_inner_sizes_and_stay_small():
    big = _attn(bucket=(4096, 4096, 256))
    batch, lq, lk = attention_backends._calibration_sizes(big)
    assert (batch, lk) == (1, 4096) and 16 <= lq < 4096
    assert attention_backends._calibration_sizes(_attn(bucket=(16, 16, 24))) == (2, 16, 16)
    m, k, n = quant_backends._calibration_sizes(
        QMatmulCall("cpu", "float32", 8, 0, True, 8, False, False, (4096, 4096, 11008))
    )
    assert k == 4096 and m >= 16 and m * k * n <= quant_backends.CALIBRATION_MACS * torch.get_num_threads()
    assert (
        quant_backends._calibration_sizes(QMatmulCall("cpu", "float32", 8, 0, True, 8, False, False, (4, 4096, 11008)))[
            0
        ]
        == 4
    )


@pytest.mark.skipif(not (CPU_OK and QCPU_OK), reason="the contenders include the cpu backend")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_real_contenders_run_and_agree(dtype):
    attn = attention_backends._calibration_contenders(
        _attn(dtype, bucket=(32, 64, 8), num_heads_q=4, num_heads_kv=2, has_bias=True)
    )
    out = {name: run() for name, run in attn.items()}
    torch.testing.assert_close(out["cpu"].float(), out["torch"].float(), atol=2e-2, rtol=2e-2)
    qmm = quant_backends._calibration_contenders(QMatmulCall("cpu", dtype, 8, 0, False, 8, True, False, (8, 64, 32)))
    out = {name: run() for name, run in qmm.items()}
    torch.testing.assert_close(out["cpu"], out["torch"], atol=0, rtol=0)  # both equal the reference
