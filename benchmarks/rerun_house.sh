#!/usr/bin/env bash
# Rerun, in one go, the benchmarks whose ratios benchmarks/README.md records for
#   extraction overhead (ResNet-18 vision, MiniLM text), all-pairs CKA, NMF vs scikit-learn,
#   and the warm nightly rerun — with the README's commands at sizes its own rows used.
#
#   benchmarks/rerun_house.sh [TREE]      # TREE: the code tree to measure (default: this checkout)
#
# The tree's own benchmark scripts run ($SCRIPTS, default TREE/benchmarks) with TREE first on
# PYTHONPATH, so `import zooaudit` / `flows` resolve to that tree (e.g. a `git worktree` of the
# base revision: `git worktree add --detach /tmp/zooaudit-base 0e17322`). Each command takes
# /tmp/heavy.lock (flock) like the README's rows; a failing command is reported and the rest run.
# At the README's sizes: about 9–11 minutes on the box its rows were taken on; several times that on a
# loaded box (see QUICK).
#
# Environment: PY (default: this checkout's .venv/bin/python), LOCK (default /tmp/heavy.lock;
# empty: no lock), SCRIPTS, ONLY (space-separated subset of: extract text cka nmf ops),
# QUICK=1: smaller sizes (README rows exist for the extract N = 2048 and CKA N = 20000 sizes; text,
# NMF and their ratios at these sizes are not comparable with the README's rows) for a box that is
# several times slower than the one the README's rows were taken on (text, CKA, NMF, ops: 12.6 min there,
# lock waits included; extract at N = 8192 alone took 14 min on that box).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
TREE="$(cd "${1:-$REPO}" && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
SCRIPTS="${SCRIPTS:-$TREE/benchmarks}"
LOCK="${LOCK-/tmp/heavy.lock}"
ONLY="${ONLY:-extract text cka nmf ops}"

export PYTHONPATH="$TREE${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$TREE/src" ] && export PYTHONPATH="$TREE/src:$PYTHONPATH"
export PREFECT_SERVER_ANALYTICS_ENABLED=false AWS_REQUEST_CHECKSUM_CALCULATION=WHEN_REQUIRED HF_HUB_OFFLINE=1
unset PREFECT_API_URL

rev="$(git -C "$TREE" rev-parse --short HEAD 2>/dev/null || echo '?')"
dirty="$(git -C "$TREE" status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
echo "rerun_house: tree $TREE (HEAD $rev, $dirty tracked files modified), scripts $SCRIPTS, $(date -u +%FT%TZ)"
echo "zooaudit from: $(cd /tmp && "$PY" -c 'import zooaudit; print(zooaudit.__file__)')"
nproc_=$(nproc); echo "cores: $nproc_, load: $(cut -d' ' -f1-3 /proc/loadavg)"

declare -a SUMMARY=()
run() {   # run NAME CMD...
  local name="$1"; shift
  case " $ONLY " in *" $name "*) ;; *) return ;; esac
  echo; echo "=== $name: $*"
  local t0=$SECONDS rc
  if [ -n "$LOCK" ]; then (cd /tmp && flock "$LOCK" "$@"); rc=$?; else (cd /tmp && "$@"); rc=$?; fi
  SUMMARY+=("$name: rc $rc, $((SECONDS - t0)) s")
  echo "=== $name: rc $rc, $((SECONDS - t0)) s"
}

T0=$SECONDS
if [ -n "${QUICK:-}" ]; then echo "sizes: QUICK (smaller than the README's rows)"; else echo "sizes: the README's rows"; fi
if [ -z "${QUICK:-}" ]; then
  # Vision extraction overhead (README: "Vision extraction overhead", ResNet-18 N = 8192, bracketed).
  run extract "$PY" "$SCRIPTS/bench_extract.py" --n 8192 --repeats 5 --shard-size 1024
  # Text-encoder extraction overhead (README: MiniLM, bracketed).
  run text "$PY" "$SCRIPTS/bench_text_extract.py" --n 2048 --batch 64 --repeats 3
  # All-pairs linear CKA (README: target row, N = 100k).
  run cka "$PY" "$SCRIPTS/bench_cka.py" speed --n 100000 --repeat 2
  # NMF vs scikit-learn (README: 200 000 × 512, k = 16, 100 iterations; 2 alternating pairs instead of 3).
  run nmf "$PY" "$SCRIPTS/bench_nmf.py" --n 200000 --iters 100 --threads 1 2 --repeats 2
else
  run extract "$PY" "$SCRIPTS/bench_extract.py" --n 2048 --repeats 5 --shard-size 512
  run text "$PY" "$SCRIPTS/bench_text_extract.py" --n 1024 --batch 64 --repeats 2
  run cka "$PY" "$SCRIPTS/bench_cka.py" speed --n 20000 --repeat 2
  run nmf "$PY" "$SCRIPTS/bench_nmf.py" --n 50000 --iters 100 --threads 1 2 --repeats 1
fi
# Warm nightly rerun (README: builtin zoo, whole test splits, threads) — the same either way.
run ops "$PY" "$SCRIPTS/bench_ops.py"

echo; echo "=== summary ($((SECONDS - T0)) s in all)"
printf '  %s\n' "${SUMMARY[@]}"
