#!/usr/bin/env bash
# One command for everything a newcomer needs:
#   ./studio.sh [launch flags]   install into .venv (first run only) and start the studio on 127.0.0.1:7860
#   ./studio.sh test             install the test extras and Chromium, then run the whole test suite
#   ./studio.sh test --fast      the fast tier: every module's core behaviour in about a minute (for the inner loop)
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first, pinned: this exact release lies on the machine's disk (a bare `torch` would download GBs)
  python -m pip install -q torch==2.14.1 torchvision==0.29.1
  python -m pip install -q -e ".[test]"
  touch "$stamp"
fi

if [ "${1:-}" = "test" ]; then
  shift
  if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    # Debian's Chromium for the browser test (Playwright drives it; nothing is downloaded by Playwright)
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
  fi
  export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
  # Test processes in parallel (pytest-xdist), one per core, each running torch on its share (tests/conftest.py).
  # A module's tests stay in one process (loadscope), so its module-scoped servers, pages and loaded models are
  # built once, and the longest modules start first (tests/conftest.py's order; --no-loadscope-reorder keeps it,
  # where xdist would sort modules by their number of tests). Measured on 2 cores: 2 processes 273-284 s,
  # 3 processes 296-302 s (a spare process paid for itself when tests were handed out one by one).
  workers=$(nproc); [ "$workers" -gt 8 ] && workers=8
  exec python -m pytest -q -n "$workers" --dist loadscope --no-loadscope-reorder "$@"
fi
exec python launch.py "$@"
