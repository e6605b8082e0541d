# The entrypoint of a submitted job: runs the staged spec with the Python the cluster's Ray
# runs its workers in (the one that has capfleet's dependencies), not the first `python` on the
# head's PATH. Ray's raylet names that interpreter in its --python_worker_command argument, and
# the raylet is an ancestor of this shell (raylet -> job supervisor -> sh). Elsewhere: `python`.
py=python
pid=$$
for _ in 1 2 3 4 5 6 7 8; do
    pid=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null)
    if [ -z "$pid" ] || [ "$pid" -le 1 ]; then
        break
    fi
    found=$(tr '\000' '\n' < "/proc/$pid/cmdline" 2>/dev/null \
        | sed -n 's/^--python_worker_command=\([^ ]*\).*/\1/p' | head -n 1)
    if [ -n "$found" ]; then
        if [ -x "$found" ]; then
            py=$found
        fi
        break
    fi
done
exec "$py" -m capfleet run capfleet-spec.toml --address auto
