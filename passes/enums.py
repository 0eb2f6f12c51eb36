"""The names the passes give regions and node kinds. Torch-free, so that the
report's tables and plots (drawn by child processes that never import
torch) spell them from the same enums the passes use."""

import enum


class Region(enum.Enum):
    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


class NodeType(enum.Enum):
    PARAM = "PARAM"
    BUFFER = "BUFFER"
    INPUT = "INPUT"
    ACT = "ACT"
    GRAD = "GRAD"
    OPT_STATE = "OPT_STATE"
    OTHER = "OTHER"
