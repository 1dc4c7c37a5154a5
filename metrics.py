"""What a running server tells the people who watch it: Prometheus metrics in a registry of the server's own
(serve.py answers GET /metrics with them) and the access log, one line per request."""
from __future__ import annotations

from engine import Engine, Request


class Metrics:
    """Prometheus metrics in a registry of their own (scraped at /metrics), and the access log: one line per
    request with its id, status, tokens, time to first token and total time."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import CounterMetricFamily

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("slm_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("slm_prompt_tokens", "prompt tokens of answered requests", registry=registry)
        self.generated_tokens = Counter("slm_generated_tokens", "tokens generated for answered requests",
                                        registry=registry)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("slm_time_to_first_token_seconds", "from a request's arrival to its first token",
                              buckets=latency, registry=registry)
        self.inter_token = Histogram("slm_inter_token_seconds", "each request's mean time between its tokens",
                                     buckets=latency, registry=registry)
        self.total = Histogram("slm_request_seconds", "from a request's arrival to its last token", buckets=latency,
                               registry=registry)
        Gauge("slm_queue_depth", "requests waiting for a row", registry=registry).set_function(engine.queued)
        Gauge("slm_busy_rows", "rows generating now", registry=registry).set_function(engine.active)
        Gauge("slm_rows", "rows the engine steps at once", registry=registry).set(engine.rows)

        class Steps:  # read from the engine at each scrape; rate(slm_engine_steps_total[1m]) is steps per second
            def collect(self):
                yield CounterMetricFamily("slm_engine_steps", "engine steps (model passes) run",
                                          value=engine.stats["steps"])
        registry.register(Steps())

    def answered(self, endpoint: str, status: int, rid: str = "-", gens: list[Request] = (),
                 usage: dict | None = None) -> None:
        """One HTTP request answered; gens: its completions, which arrived together; usage: what it was told."""
        self.requests.labels(endpoint, str(status)).inc()
        if not gens or any(gen.finished_at is None for gen in gens):
            print(f"access: {rid} {endpoint} {status}", flush=True)
            return
        arrived, tokens, prompt = gens[0].submitted, usage["completion_tokens"], usage["prompt_tokens"]
        ttft = min(gen.first_token_at or gen.finished_at for gen in gens) - arrived
        total = max(gen.finished_at for gen in gens) - arrived
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(tokens)
        self.ttft.observe(ttft)
        for gen in gens:
            if len(gen.tokens) > 1:
                self.inter_token.observe((gen.finished_at - gen.first_token_at) / (len(gen.tokens) - 1))
        self.total.observe(total)
        print(f"access: {rid} {endpoint} {status} prompt_tokens={prompt} completion_tokens={tokens} "
              f"finish={','.join(str(gen.finish_reason) for gen in gens)} ttft={ttft:.3f}s total={total:.3f}s",
              flush=True)
