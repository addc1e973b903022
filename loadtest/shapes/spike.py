"""Spike: ``-u`` users, then ``--spike-users`` for ``--spike-seconds``, then ``-u`` again while it recovers.

    locust -f loadtest/locustfile.py,loadtest/shapes/spike.py --host 127.0.0.1:8001 --headless \\
        -u 8 --spike-users 64 --spike-at 30 --spike-seconds 10 --csv spike --csv-full-history UnaryUser

The baseline runs ``--spike-at`` seconds before the spike and as long again after it, then the run ends:
``spike_stats_history.csv`` shows whether latency comes back to the baseline's and how fast (queues
drained, no request failed or timed out), which is what autoscaling and queue bounds are for.
"""

from __future__ import annotations

from locust import LoadTestShape


class Spike(LoadTestShape):
    use_common_options = True  # -u is the baseline

    def tick(self):
        opts = self.runner.environment.parsed_options
        t = self.get_run_time()
        base = opts.num_users or 1
        if t < opts.spike_at:
            return base, base
        if t < opts.spike_at + opts.spike_seconds:
            return opts.spike_users, opts.spike_users  # all at once: that is the spike
        if t < 2 * opts.spike_at + opts.spike_seconds:
            return base, opts.spike_users
        return None
