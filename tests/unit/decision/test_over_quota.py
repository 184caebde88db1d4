"""over_quota: an allow whose quota is used up becomes a 429, or goes on under allow_unauthorized."""

from authz.decision import dynamic_metadata as md
from authz.decision.authorize import over_quota
from authz.decision.model import AuthContext, AuthorizedOperation, Decision, DenyReason, Policy, Quota

AUTH = AuthContext("client", "app", "dev@example.com", ("p",))
OPS = (AuthorizedOperation("p", "api", Quota(5, 1, "minute"), quota_id="p-test-dev@example.com-app"),)
ALLOW = Decision(
    reason=None,
    api="api",
    environment="test",
    auth=AUTH,
    operations=OPS,
    metadata={md.AUTHORIZED: "true", "x-apigee-application": "app"},
    headers_to_set=((md.AUTHORIZED, "true"), ("x-apigee-application", "app")),
    headers_to_remove=("x-api-key",),
)


def test_over_quota_is_a_429_deny_that_keeps_who_and_what() -> None:
    denied = over_quota(ALLOW, Policy(org="org", env="test"))
    assert denied == Decision(
        reason=DenyReason.QUOTA_EXCEEDED, api="api", environment="test", auth=AUTH, operations=OPS
    )
    assert not denied.allowed


def test_allow_unauthorized_lets_it_through_without_the_authorized_flag() -> None:
    passed = over_quota(ALLOW, Policy(org="org", env="test", allow_unauthorized=True))
    assert passed.allowed and passed.fail_open
    assert passed.reason is DenyReason.QUOTA_EXCEEDED
    assert passed.metadata == {"x-apigee-application": "app", md.UNAUTHORIZED_REASON: "quota_exceeded"}
    assert passed.headers_to_set == (("x-apigee-application", "app"),)
    assert passed.headers_to_remove == ("x-api-key",)  # the key is still stripped upstream
