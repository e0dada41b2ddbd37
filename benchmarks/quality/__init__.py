"""bench_quality.py's parts: tasks, arms, the INC arm and the report."""
