"""The GPU window's plan (bench/gpu_plan.py, run by bench/gpu_check.sh), checked GPU-less so the
window cannot silently overflow again: every tier fits one device command of TIER_LIMIT_S and at
most MAX_OUT_FILES files; every pytest step's selection, collected here as the device would
collect it, stays within its test and Triton-compile budgets and its time estimate within its
timeout; and the runner itself times out, skips, streams and records as documented."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_plan():
    spec = importlib.util.spec_from_file_location("gpu_plan", REPO / "bench" / "gpu_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_plan"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


P = _load_plan()


@pytest.fixture(scope="module")
def counts():
    """Every pytest step's selection, collected in a fresh process (as on the device)."""
    proc = subprocess.run([sys.executable, "bench/gpu_plan.py", "--count"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("tier", sorted(P.TIERS))
def test_every_tier_fits_one_device_command(tier):
    steps = P.TIERS[tier]
    names = [s.name for s in steps]
    assert len(set(names)) == len(names), f"duplicate step names in {tier}"
    planned = sum(s.planned_s for s in steps)
    assert planned + P.RESERVE_S <= P.TIER_LIMIT_S, (
        f"tier {tier} plans {planned} s + {P.RESERVE_S} s reserve > {P.TIER_LIMIT_S} s: "
        "move a step to another tier")
    files = [*P.FIXED_OUT_FILES, *(f for s in steps for f in s.outputs)]
    assert len(files) <= P.MAX_OUT_FILES, f"tier {tier} writes {len(files)} files: {files}"
    assert len(set(files)) == len(files), f"two steps of {tier} write the same file"
    for f in files:  # the device tool returns plain names of letters, digits, '.', '_', '-'
        assert re.fullmatch(r"[A-Za-z0-9._-]+", f), f
    for s in steps:
        assert 0 < s.min_s <= s.budget_s <= P.TIER_LIMIT_S - P.RESERVE_S, s.name
        outs = [a for a in s.cmd if "{out}/" in a]
        assert {a.split("{out}/", 1)[1] for a in outs} <= set(s.outputs), (
            f"{tier}/{s.name} writes into $OUT files it does not declare")
    assert steps[0].name == "env" and steps[1] is P.LOAD_STEP, "every tier starts env, load"


def test_the_default_tier_answers_in_the_order_the_issue_asks():
    assert [s.name for s in P.TIERS["default"]] == [
        "env", "load", "cuda_kernels", "triton", "speed", "speed_attention", "energy", "sanitize"]
    triton = P.TIERS["default"][3]
    assert triton.env.get("LEANOPS_TRITON_AUTOTUNE") == "0"
    assert "not slow" in " ".join(triton.pytest) and "not autotuned" in " ".join(triton.pytest)
    sanitize = P.TIERS["default"][-1]
    assert sanitize.cmd[0] == "compute-sanitizer"
    assert sanitize.env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"


def test_pytest_steps_stay_within_their_budgets(counts):
    steps = {f"{t}/{s.name}": s for t, ss in P.TIERS.items() for s in ss if s.pytest is not None}
    assert set(counts) == set(steps)
    for key, c in counts.items():
        s = steps[key]
        assert c["tests"] > 0, f"{key} selects no test (a renamed file or marker?)"
        assert not c["unknown"], (
            f"{key}: declare the Triton compiles of {c['unknown']} in "
            "bench/gpu_plan.py COMPILES_PER_TEST")
        assert c["tests"] <= s.max_tests, f"{key}: {c['tests']} tests > budget {s.max_tests}"
        assert c["compiles"] <= s.max_compiles, (
            f"{key}: {c['compiles']} Triton compile keys > budget {s.max_compiles}")
        estimate = s.estimate_s(s.max_tests, s.max_compiles)
        assert estimate <= s.budget_s, (
            f"{key}: at its budget of {s.max_tests} tests and {s.max_compiles} compiles it would "
            f"take ~{estimate:.0f} s > its {s.budget_s} s timeout")


def test_plan_prints_every_tier_with_budgets():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--plan"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for tier, steps in P.TIERS.items():
        assert f"tier {tier}: " in proc.stdout
        for s in steps:
            assert re.search(rf"^  {re.escape(s.name)} +{s.budget_s} s", proc.stdout, re.M), s.name


def test_benchmark_steps_parse_and_name_real_providers():
    """A typo in a step's CLI arguments would cost a GPU window: parse each one here."""
    from leanops import cli
    from leanops.bench import attention as bench_attention
    from leanops.bench import matmul as bench_matmul

    providers = {"matmul": set(bench_matmul.PROVIDERS), "attention": set(bench_attention.PROVIDERS)}
    seen = 0
    for steps in P.TIERS.values():
        for s in steps:
            if s.cmd[1:3] != ("-m", "leanops.cli"):
                continue
            argv = [a.replace("{out}", "/tmp/x") for a in s.cmd[3:]]
            args = cli.build_parser().parse_args(argv)
            if getattr(args, "providers", None):
                assert set(args.providers.split(",")) <= providers[args.suite], s.name
            if getattr(args, "backends", None):
                assert set(args.backends.split(",")) <= {"cuda", "triton", "reference"}, s.name
            seen += 1
    assert seen >= 5


# ---------------------------------------------------------------------------------------------
# The runner, on fake steps


def _py(code):
    return ("{py}", "-c", code)


def test_runner_streams_times_out_skips_and_records(tmp_path):
    steps = (
        P.Step("env", 20, _py("print('hello from env')"), min_s=1, needs_gpu_build=False),
        P.Step("load", 20, _py("print('loaded')"), min_s=1, needs_gpu_build=False),
        P.Step("writes", 20, _py("import sys; open(sys.argv[1], 'w').write('{}')") + ("{out}/r.json",),
               min_s=1, outputs=("r.json",)),
        # prints, then hangs: killed at its timeout, its line already in console.log
        P.Step("hangs", 3, _py("import time; print('before the hang', flush=True); time.sleep(60)"),
               min_s=1),
        P.Step("fails", 20, _py("raise SystemExit(3)"), min_s=1),
        P.Step("too_long", 20, _py("print('never')"), min_s=1000),
    )
    rc = P.run_tier("fake", tmp_path, steps, limit_s=60, reserve_s=1)
    assert rc == 1  # "hangs" and "fails" failed
    status = json.loads((tmp_path / "status.json").read_text())
    by = {s["name"]: s for s in status["steps"]}
    assert by["env"]["rc"] == 0 and by["writes"]["files"] == ["r.json"]
    assert by["hangs"]["timed_out"] and by["hangs"]["rc"] == 124 and by["hangs"]["seconds"] < 20
    assert by["fails"]["rc"] == 3
    assert "below the step's 1000 s" in by["too_long"]["skipped"]
    log = (tmp_path / "console.log").read_text()
    assert "hello from env" in log and "before the hang" in log and "never" not in log
    assert "too_long: skipped" in log and "== tier fake:" in log


def test_a_failed_load_skips_the_steps_that_need_it(tmp_path):
    steps = (
        P.Step("load", 20, _py("raise SystemExit(1)"), min_s=1, needs_gpu_build=False),
        P.Step("tests", 20, _py("print('ran')"), min_s=1),
    )
    assert P.run_tier("fake", tmp_path, steps, limit_s=60, reserve_s=1) == 1
    status = json.loads((tmp_path / "status.json").read_text())
    assert "load step failed" in status["steps"][1]["skipped"]


# ---------------------------------------------------------------------------------------------
# The one rule for "the CUDA backend is unavailable on a GPU machine" (helpers.py, used by the
# cuda_kernels marker through conftest.py): a failure, not a skip, unless deliberate.


@pytest.mark.parametrize(
    "gpu,reason,no_extension,outcome",
    [
        (False, None, False, "skip"),  # no GPU: nothing to run the kernels on
        (True, None, False, "pass"),
        (True, "leanops._C did not load: undefined symbol", False, "fail"),  # a broken build
        (True, "leanops._C has no CUDA kernel for int8_mm", False, "fail"),  # a lost registration
        (True, "leanops._C did not load", True, "skip"),  # LEANOPS_NO_EXTENSION=1: on purpose
        (True, "Tesla T4 is sm_75; leanops GPU kernels need sm_80 or newer", False, "skip"),
    ],
)
def test_require_cuda_kernels(monkeypatch, gpu, reason, no_extension, outcome):
    import torch
    from _pytest.outcomes import Failed, Skipped
    from helpers import require_cuda_kernels
    from leanops import dispatch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(dispatch, "cuda_unavailable", lambda device, op=None: reason)
    if no_extension:
        monkeypatch.setenv("LEANOPS_NO_EXTENSION", "1")
    else:
        monkeypatch.delenv("LEANOPS_NO_EXTENSION", raising=False)
    if outcome == "pass":
        require_cuda_kernels("int8_mm")
        return
    with pytest.raises(Skipped if outcome == "skip" else Failed) as info:
        require_cuda_kernels("int8_mm")
    if reason:
        assert reason in str(info.value)


def _carried(tmp_path, monkeypatch, content):
    """A repository at tmp_path with a carried leanops._C for this Python; returns where the
    load step puts it."""
    import sysconfig

    name = f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    (tmp_path / ".gpu_carry").mkdir()
    (tmp_path / "pyext" / "leanops").mkdir(parents=True)
    (tmp_path / ".gpu_carry" / name).write_bytes(content)
    monkeypatch.setattr(P, "REPO", tmp_path)
    return tmp_path / "pyext" / "leanops" / name


def test_load_step_uses_a_carried_extension_that_loads(tmp_path, monkeypatch, capsys):
    target = _carried(tmp_path, monkeypatch, b"prebuilt")
    monkeypatch.setattr(P, "_probe", lambda: (True, '{"available": true}'))
    assert P.step_load() == 0
    assert target.read_bytes() == b"prebuilt"
    assert "loads" in capsys.readouterr().out


def test_load_step_removes_a_carried_extension_that_does_not_load(tmp_path, monkeypatch):
    target = _carried(tmp_path, monkeypatch, b"wrong ABI")
    monkeypatch.setattr(P, "_probe", lambda: (False, "undefined symbol"))
    built = []
    monkeypatch.setattr(P.subprocess, "run", lambda cmd, **kw: built.append((cmd, kw["env"])) or
                        subprocess.CompletedProcess(cmd, 1))
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda *a: (9, 0))
    assert P.step_load() == 1  # the (stubbed) build failed
    assert not target.exists()
    (cmd, env), = built
    assert cmd[1:] == ["setup.py", "build_ext", "--inplace"]
    assert env["LEANOPS_CUDA_ARCHS"] == "90a" and int(env["MAX_JOBS"]) >= 1  # this GPU's arch only
