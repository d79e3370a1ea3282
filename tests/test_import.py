"""`import leanops` never fails because the compiled extension is missing or broken: it warns
once and the ops keep working through the Triton and reference paths."""

import subprocess
import sys
import textwrap


def test_import_without_the_extension_warns_once_and_works():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["leanops._C"] = None  # makes `import leanops._C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import leanops
            import leanops.ops
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1 and "leanops._C could not be imported" in msgs[0], msgs
        import torch
        from leanops.quant import quantize_int4
        packed, scales, zeros = quantize_int4(torch.randn(8, 64), 32)
        out = leanops.ops.int4_weight_mm(torch.randn(2, 64), packed, scales, zeros, 32)
        assert out.shape == (2, 8)
        report = leanops.backends()["cuda"]
        assert report["available"] is False and "could not be imported" in report["reason"]
        assert report["ops"] == []
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
