"""Time-driven operations: a sandbox's TTL, and (later) `km at` schedules, through EventBridge Scheduler."""
