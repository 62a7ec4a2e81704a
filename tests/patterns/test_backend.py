"""The backend's contract: name resolution, calling convention, fallback, dump, logging."""
import logging
import subprocess
import sys

import pytest
import torch

import liger_compile
from liger_compile import options as liger_options
from liger_compile.pattern import Pattern, all_patterns
from models import assert_matches_eager, batch, tiny


def run_fresh_python(code: str) -> str:
    """Runs `code` in a new interpreter (nothing of this test process carried over); returns its stdout."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_backend_name_resolves_in_a_fresh_interpreter_without_import():
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda x: torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x, backend='liger')\n"
        "x = torch.rand(4, 8) + 0.5\n"
        "torch.testing.assert_close(f(x), torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x)\n"
        "assert 'liger' in torch._dynamo.list_backends(), torch._dynamo.list_backends()\n"
        "print('ok', 'liger_compile' in sys.modules)\n"
    )
    assert run_fresh_python(code) == "ok True"  # torch found us through the entry point and imported us


def test_import_twice_and_then_use_by_name():
    code = (
        "import importlib, torch, liger_compile\n"
        "importlib.reload(liger_compile)\n"
        "import liger_compile\n"
        "f = torch.compile(lambda x: x * 2, backend='liger')\n"
        "assert f(torch.ones(2)).tolist() == [2.0, 2.0]\n"
        "torch._dynamo.reset()\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "assert lookup_backend('liger') is lookup_backend('liger')\n"
        "print('ok')\n"
    )
    assert run_fresh_python(code) == "ok"


def test_mode_and_inductor_options_are_accepted():
    model = tiny("llama", layers=1)
    assert_matches_eager(model, batch(), mode="reduce-overhead")
    torch._dynamo.reset()
    assert_matches_eager(model, batch(), options={"max_autotune": False, "disable": ["rms_norm"]})


def test_mode_means_what_it_means_for_inductor():
    assert liger_options.parse("max-autotune-no-cudagraphs").inductor_config["max_autotune"] is True
    assert liger_options.parse("reduce-overhead").inductor_config == {"triton.cudagraphs": True}
    with pytest.raises(ValueError, match="unknown mode 'fastest'.*max-autotune"):
        liger_options.parse("fastest")


def test_unknown_option_is_a_clear_error_naming_the_valid_ones():
    with pytest.raises(ValueError) as err:
        liger_options.parse(None, {"dumpp": "/tmp/x"})
    message = str(err.value)
    assert "dumpp" in message and "dump" in message and "disable" in message and "torch._inductor.config" in message
    f = torch.compile(lambda x: x + 1, backend="liger", options={"not_an_option": 1})
    with pytest.raises(Exception, match="not_an_option"):
        f(torch.ones(2))


def test_every_option_is_checked():
    assert liger_options.parse(None, {"disable": "rms_norm"}).disable == ("rms_norm",)  # one name, not letters
    assert liger_options.parse(None, {"disable": ("rotary", "causal_mask")}).disable == ("rotary", "causal_mask")
    with pytest.raises(ValueError, match=r"unknown pattern\(s\) \['rmsnorm'\]; valid names: .*\brms_norm\b"):
        liger_options.parse(None, {"disable": ["rmsnorm"]})
    for key, value in [("disable", 3), ("disable", [None]), ("fallback", "no"), ("inductor", 0),
                       ("skip_logits", None), ("offload_activations", "yes"), ("dump", 1), ("report", {})]:
        with pytest.raises(ValueError, match=f"option '{key}' must be"):
            liger_options.parse(None, {key: value})
    with pytest.raises(ValueError, match="options must be a dict"):
        liger_options.parse(None, [("dump", "x")])


def test_disable_option_skips_a_pattern():
    report = liger_compile.Report()
    f = torch.compile(tiny("llama", layers=1), backend="liger", options={"disable": "rms_norm", "report": report})
    f(**batch())
    assert report.counts["rms_norm"] == 0 and report.counts["rotary"] == 1, str(report)


def _raising_replacement(**_):
    raise RuntimeError("planted failure inside a replacement")


def test_error_inside_the_rewrite_falls_back_to_inductor(monkeypatch, caplog):
    llama_form = next(p for p in all_patterns() if p.variant == "llama")
    broken = Pattern("rms_norm", "broken", llama_form.search, _raising_replacement, anchor="rsqrt")
    monkeypatch.setattr("liger_compile.backend.all_patterns", lambda: (broken, *all_patterns()))
    report = liger_compile.Report()
    with caplog.at_level(logging.WARNING, logger="liger_compile"):
        assert_matches_eager(tiny("llama", layers=1), batch(), options={"report": report})
    assert report.fallbacks and "planted failure" in report.fallbacks[0]
    assert any("planted failure" in r.getMessage() for r in caplog.records)


def test_fallback_false_raises_instead():
    llama_form = next(p for p in all_patterns() if p.variant == "llama")
    broken = Pattern("rms_norm", "broken", llama_form.search, _raising_replacement)
    from liger_compile.backend import rewrite_graph

    gm = torch.fx.symbolic_trace(lambda x, w: llama_form.search(x, w, 1e-6, -1, torch.float32))
    opts = liger_options.parse(None, {"fallback": False})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("liger_compile.backend.all_patterns", lambda: (broken,))
        with pytest.raises(RuntimeError, match="planted failure"):
            rewrite_graph(gm, opts)


def test_dump_writes_before_after_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGER_COMPILE_DUMP", str(tmp_path / "env"))
    torch.compile(tiny("llama", layers=1), backend="liger", options={"inductor": False})(**batch())
    torch._dynamo.reset()
    torch.compile(tiny("llama", layers=1), backend="liger", options={"dump": str(tmp_path / "opt"),
                                                                       "inductor": False})(**batch())
    for folder in ("env", "opt"):
        files = sorted(p.name for p in (tmp_path / folder).iterdir())
        (stem,) = {f.rsplit("_", 1)[0] for f in files}  # the model is one graph (numbered across the process)
        assert files == [f"{stem}_after.py", f"{stem}_before.py", f"{stem}_report.txt"], files
        after = (tmp_path / folder / f"{stem}_after.py").read_text()
        before = (tmp_path / folder / f"{stem}_before.py").read_text()
        assert "liger.rms_norm" in after and "rsqrt" in before and "rsqrt" not in after
        assert "rms_norm" in (tmp_path / folder / f"{stem}_report.txt").read_text()


def test_one_info_log_line_per_graph(caplog):
    with caplog.at_level(logging.INFO, logger="liger_compile"):
        torch.compile(tiny("llama", layers=1), backend="liger", options={"inductor": False})(**batch())
    lines = [r.getMessage() for r in caplog.records if r.name == "liger_compile"]
    assert len(lines) == 1 and "rms_norm=3" in lines[0], lines


def test_each_explain_numbers_its_graphs_from_zero():
    model, inputs = tiny("llama", layers=1), batch()
    for _ in range(2):
        torch._dynamo.reset()
        report = liger_compile.explain(model, **inputs)
        assert [g.index for g in report.graphs] == list(range(len(report.graphs))), str(report)
        assert str(report).splitlines()[1].startswith("graph 0:"), str(report)
