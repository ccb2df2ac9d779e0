#!/usr/bin/env bash
# Mutation testing of one module against the fast tests that pin it (docs/testing.md); not in CI (slow).
#   bench/mutation.sh osprey/mask_extractor.py tests/test_mask_extractor.py
#   bench/mutation.sh "eval/metrics/*.py" tests/test_eval_metrics.py
# Runs in a temporary copy of the tracked files, so the checkout stays clean and several modules can run at once;
# MUTMUT_CHILDREN (default 2) parallel test processes. Prints the survivors; `cd` into the printed folder and
# `mutmut show NAME` to read one.
# MUTATION_SAMPLE=N tests only N of the module's mutants, drawn with random.Random(MUTATION_SEED, default 28)
# from their sorted names (reproducible: same code, same sample); the others are reported "not checked".
# MUTATION_NAMES=FILE tests only the mutants named in FILE, one a line (e.g. an earlier run's survivors, after adding
# tests: names stay the same while the module's code does).
set -euo pipefail
module=$1; shift
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d /tmp/osprey-mutation.XXXXXX)
(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work")
cd "$work"
# Point [tool.mutmut] at this module and these tests only: each mutant then runs only the listed tests that
# reach the mutated function, instead of every slow server or training test that happens to call it.
python - "$module" "$@" <<'PY'
import json, re, sys
from pathlib import Path
module, tests = sys.argv[1], sys.argv[2:]
text = Path("pyproject.toml").read_text()
text = re.sub(r"\n\[tool\.mutmut\]\n(?:[^\[].*\n|\s*\n)*", "\n", text)
text += ("\n[tool.mutmut]\nsource_paths = [\"osprey\", \"serve\", \"eval\"]\n"
         f"only_mutate = {json.dumps([module])}\n"
         "also_copy = [\"tests\", \"train\", \"data_tools\", \"bench\", \"pyproject.toml\"]\n"
         f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
         "pytest_add_cli_args = [\"-p\", \"no:randomly\", \"-q\"]\n"
         # a mutant's test run is timed against the clean run; on a busy machine the default 1 s margin made
         # most mutants of a millisecond function 'time out' (not a verdict): allow 30 s
         "timeout_constant = 30.0\n")
Path("pyproject.toml").write_text(text)
PY
# One torch thread: mutmut forks a child per mutant, and a child forked after OpenMP's pool started can hang.
export OMP_NUM_THREADS=1
mkdir -p "$work/mutants"  # exists before Python starts: a missing PYTHONPATH entry would be cached as absent
export PYTHONPATH="$work/mutants"  # the mutated copy, not an installed checkout
if [[ -n "${MUTATION_NAMES:-}" ]]; then
  mapfile -t names < "$MUTATION_NAMES"
  mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${names[@]}" > mutmut.log 2>&1 || true
elif [[ -n "${MUTATION_SAMPLE:-}" ]]; then
  # generate the mutants only (mutmut's own first steps), then draw the sample from their names
  python - "$MUTATION_SAMPLE" "${MUTATION_SEED:-28}" > sample.log 2>&1 <<'PY'
import json, random, sys
from pathlib import Path
from mutmut.__main__ import create_mutants
from mutmut.mutation.trampoline import set_mutant_under_test
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths
set_mutant_under_test("mutant_generation")
Path("mutants").mkdir(exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); create_mutants(1)
names = sorted(k for meta in Path("mutants").rglob("*.meta") for k in json.loads(meta.read_text())["exit_code_by_key"])
sample = random.Random(int(sys.argv[2])).sample(names, min(int(sys.argv[1]), len(names)))
Path("sample.txt").write_text("\n".join(sorted(sample)) + "\n")
print(f"sampled {len(sample)} of {len(names)} mutants (seed {sys.argv[2]}): sample.txt")
PY
  tail -n 1 sample.log
  mapfile -t sample < sample.txt
  mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${sample[@]}" > mutmut.log 2>&1 || true
else
  mutmut run --max-children "${MUTMUT_CHILDREN:-2}" > mutmut.log 2>&1 || true
fi
echo "mutation run in $work"
mutmut results --all true 2>/dev/null | awk '{print $NF}' | sort | uniq -c || true
mutmut results
