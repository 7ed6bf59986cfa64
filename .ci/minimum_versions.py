"""Print a pip constraints file pinning every dependency pyproject.toml declares (the core ones and the extras
named on the command line) to its declared lower bound: what `.ci/minimum_versions.sh` installs.

    python3 .ci/minimum_versions.py export > minimum.txt
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", requirement)
    if floor is None:
        sys.exit(f"pyproject.toml: {requirement!r} declares no lower bound (>=): every dependency needs one")
    print(f"{name}=={floor.group(1)}")
