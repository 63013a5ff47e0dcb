"""LambdaSshKey: the session's public key registered in the Lambda account under a session-unique
name; deleting the resource removes it from the account."""

from __future__ import annotations

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, DiffResult, ReadResult, Resource, ResourceProvider

from gpu_session.clouds import CloudError, NotFound
from gpu_session.clouds.base import validate_name

from .credentials import CloudAccess

INPUTS = ("name", "public_key")


class LambdaSshKeyProvider(CloudAccess, ResourceProvider):
    def check(self, olds, news):
        failures = []
        try:
            validate_name(str(news.get("name", "")), "SSH key name")
        except CloudError as e:
            failures.append(CheckFailure("name", str(e)))
        if not str(news.get("public_key", "")).startswith(("ssh-ed25519 ", "ssh-rsa ", "ecdsa-sha2-")):
            failures.append(CheckFailure("public_key", "an OpenSSH public key (ssh-ed25519 …) is needed"))
        return CheckResult(news, failures)

    def diff(self, id_, olds, news):
        replaces = [k for k in INPUTS if olds.get(k) != news.get(k)]
        return DiffResult(changes=bool(replaces), replaces=replaces, delete_before_replace=True)

    def create(self, props):
        key = self.cloud("lambda").register_ssh_key(props["name"], props["public_key"])  # adopts a same-named same key
        return CreateResult(key.id, {**props, "key_id": key.id})

    def read(self, id_, props):
        if not any(k.id == id_ for k in self.cloud("lambda").list_ssh_keys()):
            return ReadResult("", {})
        return ReadResult(id_, props)

    def delete(self, id_, props):
        try:
            self.cloud("lambda").delete_ssh_key(id_)
        except NotFound:
            pass  # already gone


class LambdaSshKey(Resource, module="gpu_session", name="LambdaSshKey"):
    key_id: pulumi.Output[str]

    def __init__(self, resource_name: str, *, name, public_key, opts: pulumi.ResourceOptions | None = None):
        super().__init__(LambdaSshKeyProvider(), resource_name, {"name": name, "public_key": public_key, "key_id": None}, opts)
