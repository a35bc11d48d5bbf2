"""The one bytes-like type every layer passes around.

``Buffer`` is what a device reads into or writes from and what a stream sends:
``bytes``, ``bytearray`` or ``memoryview``. It lives on the bottom floor so a
byte stream (``transport/``) need not know that a block engine (``storage/``)
exists. (``collections.abc.Buffer`` would do from Python 3.12.)
"""

Buffer = bytes | bytearray | memoryview
