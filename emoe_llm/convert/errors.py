"""The one exception type of the converter: bad input or a failed check, with a message meant for the user."""


class ConversionError(Exception):
    """The checkpoint (or the options) cannot be converted/verified; the message names the file or tensor."""
