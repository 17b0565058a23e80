"""The one exception type for mistakes a user can fix; the CLI prints it as a single line."""


class UserError(Exception):
    """A problem in the user's input (recipe, file, flag), with the message telling the fix."""
