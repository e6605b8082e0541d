# The entrypoint of a submitted job: runs the staged spec with the Python the cluster's Ray
# runs its workers in (the one that has capfleet's dependencies), not the first `python` on the
# head's PATH. Ray's raylet names that interpreter in its --python_worker_command argument, and
# every process Ray starts knows the raylet's pid (RAY_RAYLET_PID). Elsewhere: `python`.
py=python
if [ -r "/proc/${RAY_RAYLET_PID:-0}/cmdline" ]; then
    found=$(tr '\000' '\n' < "/proc/$RAY_RAYLET_PID/cmdline" \
        | sed -n 's/^--python_worker_command=\([^ ]*\).*/\1/p' | head -n 1)
    if [ -x "$found" ]; then
        py=$found
    fi
fi
exec "$py" -m capfleet run capfleet-spec.toml --address auto
