"""C-STORE and C-ECHO status codes we answer with (PS3.4 Annex B, PS3.7 Annex C)."""

SUCCESS = 0x0000
#: Refused, out of resources: the spool could not take the instance (disk full, below its
#: free-space floor, back-pressure, unwritable). Senders retry these.
OUT_OF_RESOURCES = 0xA700
#: Refused, out of resources, for a reason we did not foresee (any exception in the handler).
OUT_OF_RESOURCES_UNEXPECTED = 0xA7FF
#: Error: cannot understand (the request carried no usable dataset).
CANNOT_UNDERSTAND = 0xC000
