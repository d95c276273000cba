"""What the processes rpofs starts inherit of its environment.

A passphrase given as $RPOFS_PASSPHRASE is read once by the command line and
must not reach a child: a daemon's /proc/<pid>/environ is readable for as
long as it runs (a mount, a journal server, qemu-nbd, fusermount3). The key
reaches the processes that need it through a pipe (--key-fd). The command
line also removes the secrets from its own environment once read (so that a
child a library starts, such as libnbd's, gets none either); every child
rpofs starts itself gets child_env() as well, whatever its caller did."""

import os

SECRETS = ("RPOFS_PASSPHRASE",)


def child_env() -> dict[str, str]:
    """This process's environment without rpofs's secrets."""
    return {name: value for name, value in os.environ.items() if name not in SECRETS}


def take_secrets() -> dict[str, str]:
    """Remove the secrets from this process's environment and return them:
    the command line takes them once, before anything can start a child."""
    return {name: os.environ.pop(name) for name in SECRETS if name in os.environ}
