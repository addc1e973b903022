"""Step ramp to saturation: ``--step-users`` more users every ``--step-seconds`` up to ``--max-users``, then stop.

    locust -f loadtest/locustfile.py,loadtest/shapes/step_ramp.py --host 127.0.0.1:8001 --headless \\
        --step-users 4 --step-seconds 30 --max-users 64 --csv ramp --csv-full-history UnaryUser

Each step holds its user count long enough for the latency of that load to settle; ``ramp_stats_history.csv``
then shows, per second, the user count and the throughput and latency it gave: where throughput stops
rising while latency climbs is the server's saturation point. The run ends after the last step.
"""

from __future__ import annotations

import math

from locust import LoadTestShape


class StepRamp(LoadTestShape):
    def tick(self):
        opts = self.runner.environment.parsed_options
        steps = math.ceil(opts.max_users / opts.step_users)
        step = int(self.get_run_time() // opts.step_seconds)
        if step >= steps:
            return None
        users = min(opts.max_users, opts.step_users * (step + 1))
        return users, opts.step_users  # spawn a step's users within a second
