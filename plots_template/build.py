"""Build plots_template/index.html: DVC's plot page with vega, vega-lite and vega-embed inlined.

`dvc plots show` loads these three libraries from a CDN, so its page is blank offline. This
template (set as `plots.html_template` in .dvc/config) carries them inline instead, taken from
their npm packages at the versions below (the majors DVC's specs are written for). The built
file is committed, so that users need neither npm nor the network; run this script only to
change versions:

    python plots_template/build.py       # needs npm and access to the npm registry
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# package -> (version, file inside the package). BSD-3-Clause, University of Washington
# Interactive Data Lab; their licences are in LICENSES.md next to this file.
PACKAGES = {
    "vega": ("5.33.1", "build/vega.min.js"),
    "vega-lite": ("5.23.0", "build/vega-lite.min.js"),
    "vega-embed": ("6.29.0", "build/vega-embed.min.js"),
}

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (misalign, offline)</title>
    <!-- vega, vega-lite and vega-embed inlined by plots_template/build.py: no network -->
{libraries}
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main() -> int:
    libraries = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, member) in PACKAGES.items():
            subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True)
            archive = Path(tmp) / f"{name}-{version}.tgz"
            with tarfile.open(archive) as tar:
                source = tar.extractfile(f"package/{member}")
                assert source is not None, f"{member} missing from {archive.name}"
                code = source.read().decode("utf-8")
            if "</script" in code.lower():
                raise SystemExit(f"{name} contains '</script' and cannot be inlined")
            libraries.append(f"    <script>/* {name} {version}, BSD-3-Clause */\n{code}\n</script>")
    page = PAGE.replace("{{", "{").replace("}}", "}")
    page = page.replace("{libraries}", "\n".join(libraries))
    (HERE / "index.html").write_text(page, encoding="utf-8")
    sys.stdout.write(f"wrote {HERE / 'index.html'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
