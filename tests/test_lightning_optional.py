"""tessera.lightning without Lightning: importing works, using it is one line naming the extra.

Apart from test_lightning.py, which is skipped as a whole where Lightning is not installed: this
test runs everywhere (absence is simulated in a subprocess, as ``None`` in ``sys.modules``).
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_without_lightning_one_line_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['lightning_fabric'] = None\n"
        "sys.modules['pytorch_lightning'] = None\n"
        "import tessera.lightning\n"
        "try:\n"
        "    tessera.lightning.TesseraCheckpointIO()\n"
        "except tessera.TesseraError as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "LightningUnavailableError tessera.lightning needs Lightning: "
        "pip install 'tessera-checkpoint[lightning]'\n"
    )


def test_importing_the_plug_in_imports_no_lightning() -> None:
    """Lightning (seconds of imports) is imported when a TesseraCheckpointIO is made, not before."""
    code = (
        "import json, sys, tessera.lightning\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert "tessera" in loaded and not loaded & {"lightning", "lightning_fabric", "pytorch_lightning"}
