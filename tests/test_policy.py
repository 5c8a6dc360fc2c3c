"""The visibility rules (store.policy), as a table: pure logic, no kernel."""

from __future__ import annotations

import pytest

from modelfs_store.policy import Caller, Grant, Owned, Policy, owner_key, pull_refusal, quota_refusal

OWNER, OTHER = 1000, 1001
A, B = "org.example.A", "org.example.B"
SHARED = Owned("open-model", "shared", A, None)
PRIVATE = Owned("secret", "private", A, None)


@pytest.mark.parametrize(("caller", "grants", "sees"), [
    (Caller(OWNER, None), [], True),                          # the owner at a shell
    (Caller(OWNER, A), [], True),                             # the owning app, as the owner
    (Caller(OWNER, B), [], False),                            # another app of the owner: not until granted
    (Caller(OWNER, B), [Grant(B, "secret", OWNER)], True),
    (Caller(OTHER, None), [], False),                         # another uid, no app
    (Caller(OTHER, A), [], False),                            # another uid claiming app A: not A's owner uid
    (Caller(OTHER, A), [Grant(A, "secret", OWNER)], False),   # a grant binds the uid it names
    (Caller(OTHER, A), [Grant(A, "secret", OTHER)], True),
    (Caller(OTHER, None), [Grant(A, "secret", OTHER)], False),
    (Caller(OTHER, B), [Grant(A, "secret", None)], False),
    (Caller(OTHER, A), [Grant(A, "secret", None)], True),     # --any-uid: advisory
    (Caller(OWNER, None, sure=False), [], False),             # unidentified: fails closed
    (Caller(OTHER, A, sure=False), [Grant(A, "secret", None)], False),
    (Caller(OWNER, A), [Grant(A, "other-model", OWNER)], True),
])
def test_private_model(caller: Caller, grants: list[Grant], sees: bool) -> None:
    assert Policy(OWNER, grants).sees(caller, PRIVATE) is sees


@pytest.mark.parametrize("caller", [Caller(OWNER, None), Caller(OTHER, B), Caller(0, None, sure=False)])
def test_shared_model_is_seen_by_every_caller(caller: Caller) -> None:
    assert Policy(OWNER).sees(caller, SHARED)


def test_a_private_model_owned_by_another_uid() -> None:
    theirs = Owned("theirs", "private", B, OTHER)
    policy = Policy(OWNER)
    assert policy.sees(Caller(OTHER, B), theirs)
    assert not policy.sees(Caller(OWNER, B), theirs)
    assert policy.sees(Caller(OWNER, None), theirs)  # the store owner at a shell reads the store anyway


def test_only_shared_models_are_uniform() -> None:
    assert Policy.uniform(SHARED) and not Policy.uniform(PRIVATE)


# -- what callers other than the store owner may do through the daemon -------------------
def test_a_model_another_user_pulled_without_an_app_is_theirs() -> None:
    theirs = Owned("mine", "private", None, OTHER)
    policy = Policy(OWNER)
    assert policy.sees(Caller(OTHER, None), theirs) and policy.owns(Caller(OTHER, None), theirs)
    assert not policy.sees(Caller(OTHER + 1, None), theirs)
    assert not policy.sees(Caller(OTHER, A), theirs)          # their apps are not them
    assert policy.sees(Caller(OWNER, None), theirs)           # the store owner sees everything
    assert not policy.owns(Caller(OWNER, None), theirs)
    assert not policy.owns(Caller(OTHER, None, sure=False), theirs)
    assert not policy.owns(Caller(OWNER, None), Owned("m", "shared", None, None))  # nobody's: the store's


def test_owner_key_records_the_store_owner_as_null() -> None:
    assert owner_key(Caller(OWNER, A), OWNER) == (A, None)
    assert owner_key(Caller(OTHER, None), OWNER) == (None, OTHER)


def test_who_is_the_store_owner_on_the_socket() -> None:
    policy = Policy(OWNER)
    assert policy.is_admin(Caller(OWNER, None)) and not policy.is_admin(Caller(0, None))  # root becomes the owner
    assert not policy.is_admin(Caller(OWNER, A))               # an app of the owner is that app
    assert not policy.is_admin(Caller(OWNER, None, sure=False))
    assert not policy.is_admin(Caller(OTHER, None))


@pytest.mark.parametrize(("mode", "signed", "refused"), [
    ("deny", True, True), ("signed", True, False), ("signed", False, True), ("any", False, False),
    ("bogus", True, True),
])
def test_apps_pull_modes(mode: str, signed: bool, refused: bool) -> None:
    assert (pull_refusal(mode, signed=signed) is not None) == refused


def test_quota() -> None:
    assert quota_refusal(10, 10**9, None) is None
    assert quota_refusal(10, 90, 100) is None
    assert "over the quota" in (quota_refusal(11, 90, 100) or "")
    assert "not known" in (quota_refusal(0, None, 100) or "")
