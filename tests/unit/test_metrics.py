from prometheus_client import generate_latest

from authz.metrics import new_metrics


def test_loop_histogram_exposes_cumulative_buckets_count_and_sum():
    metrics = new_metrics(buckets=(0.001, 0.01))
    series = metrics.auth_requests.labels("o", "e", "200")
    for value in (0.0005, 0.001, 0.005, 2.0):  # a value equal to a bound falls in that bucket (le)
        series.observe(value)
    assert metrics.auth_requests.labels("o", "e", "200") is series
    text = generate_latest(metrics.registry).decode()
    assert 'auth_requests_seconds_bucket{code="200",env="e",le="0.001",org="o"} 2.0' in text
    assert 'auth_requests_seconds_bucket{code="200",env="e",le="0.01",org="o"} 3.0' in text
    assert 'auth_requests_seconds_bucket{code="200",env="e",le="+Inf",org="o"} 4.0' in text
    assert 'auth_requests_seconds_count{code="200",env="e",org="o"} 4.0' in text
    get = metrics.registry.get_sample_value
    assert get("auth_requests_seconds_sum", {"org": "o", "env": "e", "code": "200"}) == 2.0065


def test_each_call_gets_a_fresh_registry():
    first, second = new_metrics(), new_metrics()
    first.auth_requests.labels("o", "e", "200").observe(0.1)
    assert (
        second.registry.get_sample_value(
            "auth_requests_seconds_count", {"org": "o", "env": "e", "code": "200"}
        )
        is None
    )
