"""The one exception type that means "the request is wrong": the CLI turns it into exit code 2."""


class UserError(Exception):
    """Bad input. The message is one sentence naming the problem and the fix."""
