#!/usr/bin/env bash
# Build the documentation site in strict mode: a broken link, a page missing from the navigation or a docstring
# that does not match its signature fails the build. Installs nothing: .ci/run installs the `docs` extra first.
# The site goes to site/ (git-ignored); DOCS_SITE_DIR chooses another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_MKDOCS_2_WARNING=1   # Material's banner about MkDocs 2; not a problem with this build
# The reference documents the worktree's source, whatever emakit is installed.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python -m mkdocs build --strict --site-dir "${DOCS_SITE_DIR:-site}"
