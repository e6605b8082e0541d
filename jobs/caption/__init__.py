"""The caption job, its stages in the order the data flows: caption_config, listing, fetch, load,
worker, parts, summary, report; job wires them on cluster/pool; planner sizes a cluster for it;
transform offers the worker to users' own Ray Data jobs."""
