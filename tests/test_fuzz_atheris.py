"""The atheris harness (fuzz/fuzz_parsers.py: seal canonicalisation, card number,
token and domain parsing) runs for a few thousand coverage-guided inputs without a
crash, a broken promise or a hang. `make fuzz SECONDS=N` runs it for longer."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

HARNESS = REPO / "fuzz" / "fuzz_parsers.py"


def test_the_atheris_harness_finds_no_crash_in_thousands_of_inputs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(HARNESS), "-runs=30000", "-max_total_time=120", "-timeout=10", "-seed=1",
         f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    crashes = [path.name for path in tmp_path.iterdir()]
    assert done.returncode == 0 and not crashes, (crashes, done.stderr[-4000:])
    assert "Done 30000 runs" in done.stderr


def test_a_lone_surrogate_in_fields_json_is_invalid_argument_not_a_crash():
    # Found by the harness: a Python caller (not gRPC, whose strings are UTF-8) can send one.
    import pytest

    from keysvc.errors import InvalidArgument
    from keysvc.model import Charset
    from keysvc.seal_formats import SealScheme, build
    from keysvc.seals import SealRequest

    request = SealRequest(key_id="m/k", scheme=SealScheme.SIPS_POST, fields_json='{"a": "\udcdd"}')
    with pytest.raises(InvalidArgument, match="fields_json"):
        build(SealScheme.SIPS_POST, request, Charset.UTF_8)
