#!/usr/bin/env bash
# Build emakit's sdist and wheel, check what the wheel holds, then install the wheel (not editable) into a fresh
# venv and use it from outside the repository, the way users will. CI's editable install cannot notice a file
# missing from the wheel (a module, py.typed, the method card); this script does. Any failure exits non-zero.
#
# The build runs on a clean copy of the files git would commit (tracked, plus untracked files that are not
# ignored), so stale build/ output or stray local files cannot leak into the wheel. WHEEL_SMOKE_EXTRAS (default
# "demo") chooses the extras installed with the wheel; e.g. "demo,lightning,transformers" also imports the
# framework integrations (slower: a few more minutes of installs).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1
extras=${WHEEL_SMOKE_EXTRAS:-demo}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/emakit-wheel-smoke.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail() {
    echo "wheel_smoke: FAIL: $*" >&2
    exit 1
}
step() { echo "== [${SECONDS}s] $*"; }

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' src/emakit/_version.py)
[[ -n "$version" ]] || fail "no '__version__ = \"...\"' line in src/emakit/_version.py"

# --- 1. the files a commit would hold, copied to a clean tree -------------------------------------------------
step "copying the source tree"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard >"$tmp/files.z"
else
    echo "wheel_smoke: not a git checkout; building from every file under $repo" >&2
    find . -path ./.git -prune -o -type f -print0 | sed -z 's|^\./||' >"$tmp/files.z"
fi
mkdir "$tmp/src"
# Skip files that git still tracks but the working tree has deleted.
while IFS= read -r -d '' f; do
    if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi
done <"$tmp/files.z" | tar --null -T - -cf - | tar -xf - -C "$tmp/src"

# --- 2. build and check the distributions ----------------------------------------------------------------------
step "python -m build --sdist --wheel"
(cd "$tmp/src" && python -m build --sdist --wheel --outdir "$tmp/dist" .) >"$tmp/build.log" 2>&1 || {
    cat "$tmp/build.log" >&2
    fail "python -m build failed (log above)"
}
shopt -s nullglob
wheels=("$tmp"/dist/*.whl)
sdists=("$tmp"/dist/*.tar.gz)
shopt -u nullglob
[[ ${#wheels[@]} -eq 1 && ${#sdists[@]} -eq 1 ]] || fail "expected one wheel and one sdist, got: $(ls "$tmp/dist")"
wheel=${wheels[0]}
[[ "$(basename "$wheel")" == "emakit-${version}-py3-none-any.whl" ]] ||
    fail "wheel is named $(basename "$wheel"), expected emakit-${version}-py3-none-any.whl (version from _version.py)"

step "twine check"
python -m twine check --strict "$tmp"/dist/* || fail "twine check rejected the distributions"

step "the wheel's files"
python -m zipfile -l "$wheel"

step "checking the wheel's contents"
# Expected: LICENSE under .dist-info/licenses/, py.typed, and every .py and .md file of the package.
python - "$wheel" "$version" "$tmp/src" "${sdists[0]}" <<'PY' || fail "the distributions' contents are wrong (see above)"
import pathlib
import sys
import tarfile
import zipfile

wheel, version, src, sdist = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4]
names = set(zipfile.ZipFile(wheel).namelist())
# PEP 639 metadata in both distributions, and the licence text in the sdist too.
metadata = zipfile.ZipFile(wheel).read(f"emakit-{version}.dist-info/METADATA").decode()
with tarfile.open(sdist) as tar:
    sdist_names = set(tar.getnames())
    pkg_info = tar.extractfile(f"emakit-{version}/PKG-INFO").read().decode()
for where, text in (("wheel METADATA", metadata), ("sdist PKG-INFO", pkg_info)):
    for field in ("License-Expression: Apache-2.0", "License-File: LICENSE"):
        if field not in text.splitlines():
            sys.exit(f"{where} lacks the line {field!r}")
if f"emakit-{version}/LICENSE" not in sdist_names:
    sys.exit("the sdist lacks LICENSE")
package = src / "src"
expected = {f"emakit-{version}.dist-info/licenses/LICENSE", "emakit/py.typed", "emakit/algorithms/ema/README.md"}
for path in (package / "emakit").rglob("*"):
    if path.suffix in (".py", ".md") and "__pycache__" not in path.parts:
        expected.add(path.relative_to(package).as_posix())
missing = sorted(expected - names)
stray = sorted(n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(("tests/", "src/")))
if missing:
    print("missing from the wheel:", *missing, sep="\n  ", file=sys.stderr)
if stray:
    print("in the wheel but should not be:", *stray, sep="\n  ", file=sys.stderr)
if missing or stray:
    sys.exit(1)
license_text = zipfile.ZipFile(wheel).read(f"emakit-{version}.dist-info/licenses/LICENSE").decode()
if "Apache License" not in license_text or "Version 2.0" not in license_text:
    sys.exit("the wheel's LICENSE is not the Apache License 2.0")
print(f"ok: {len(expected)} expected files present ({sum(n.endswith('.py') for n in expected)} modules)")
PY

# --- 3. install the wheel into a fresh venv ------------------------------------------------------------------
# No --system-site-packages: the base environment holds emakit as an editable install, whose import hook would
# supply any module the wheel lacks. --no-compile: byte-compiling torch costs more than the whole smoke run.
step "fresh venv; torch==2.13.0 first (the local CPU wheel, not a CUDA build)"
python -m venv "$tmp/venv"
vpy="$tmp/venv/bin/python"
"$vpy" -m pip install --quiet --no-compile torch==2.13.0 || fail "could not install torch==2.13.0 into the venv"
step "installing the wheel with extras [$extras]"
"$vpy" -m pip install --quiet --no-compile "${wheel}[${extras}]" || fail "could not install ${wheel}[${extras}]"

# --- 4. use it from outside the repository ------------------------------------------------------------------
cd "$tmp"
unset PYTHONPATH

step "emakit --version"
out=$("$tmp/venv/bin/emakit" --version) || fail "'emakit --version' exited non-zero"
echo "$out"
[[ "$out" == "emakit $version" ]] || fail "'emakit --version' printed '$out', expected 'emakit $version'"

step "importing every module of the installed package"
"$vpy" - "$tmp/venv" "$version" <<'PY' || fail "importing the installed package failed (see above)"
import importlib
import importlib.resources
import importlib.util
import pathlib
import pkgutil
import sys

venv, version = pathlib.Path(sys.argv[1]).resolve(), sys.argv[2]
import emakit

origin = pathlib.Path(emakit.__file__).resolve()
if venv not in origin.parents:
    sys.exit(f"emakit was imported from {origin}, not from the venv {venv}")
if emakit.__version__ != version:
    sys.exit(f"emakit.__version__ is {emakit.__version__!r}, _version.py says {version!r}")

# An integration module needs its framework; leave it out only when that framework is not installed here.
FRAMEWORKS = {"lightning": "lightning", "transformers": "transformers", "hf": "transformers", "accelerate": "accelerate"}


def missing_framework(name: str) -> str | None:
    if not name.startswith("emakit.integrations."):
        return None
    leaf = name.split(".")[2]
    for key, framework in FRAMEWORKS.items():
        if key in leaf and importlib.util.find_spec(framework) is None:
            return framework
    return None


walk_errors: list[str] = []
names = {m.name for m in pkgutil.walk_packages(emakit.__path__, "emakit.", onerror=walk_errors.append)}
# walk_packages does not enter a folder without __init__.py (a namespace package); the installed files do.
root = origin.parent
for path in root.rglob("*.py"):
    parts = path.relative_to(root.parent).with_suffix("").parts
    names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
names.discard("emakit")
failures, skipped, imported = [], [], 0
for name in sorted(names | set(walk_errors)):
    framework = missing_framework(name)
    if framework is not None:
        skipped.append(f"{name} ({framework} not installed)")
        continue
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # report every module that fails, not just the first
        failures.append(f"{name}: {type(exc).__name__}: {exc}")
        continue
    # A namespace package has no __file__, only its __path__ folders.
    places = [module.__file__] if module.__file__ else list(getattr(module, "__path__", []))
    outside = [p for p in places if venv not in pathlib.Path(p).resolve().parents]
    if outside or not places:
        failures.append(f"{name} was imported from {places}, not from the venv")
    imported += 1

for what, path in (("emakit", "py.typed"), ("emakit.algorithms.ema", "README.md")):
    if not importlib.resources.files(what).joinpath(path).is_file():
        failures.append(f"{what}/{path} is not installed")
for line in skipped:
    print("skipped:", line)
if failures:
    print("failed:", *failures, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"ok: imported {imported} modules from {venv}")
PY

step "emakit demo --epochs 1 --no-plot"
"$tmp/venv/bin/emakit" demo --epochs 1 --out "$tmp/run" --no-plot || fail "'emakit demo' exited non-zero"
for f in metrics.jsonl summary.json ema_weights.safetensors checkpoints/latest.pt; do
    [[ -s "$tmp/run/$f" ]] || fail "'emakit demo' did not write $f"
done

step "wheel smoke passed"
