"""Cache methods by name: eviction methods (one file each), quantizers (KIVI, OTT) and modifiers (CaliDrop)."""

from kvrt.methods.calidrop import CaliDrop
from kvrt.methods.h2o import H2O
from kvrt.methods.kivi import KIVI
from kvrt.methods.ott import OTT
from kvrt.methods.pyramidkv import PyramidKV
from kvrt.methods.snapkv import SnapKV
from kvrt.methods.streaming import StreamingLLM

EVICTION_METHODS = {cls.name: cls for cls in (StreamingLLM, H2O, SnapKV, PyramidKV)}
QUANTIZERS = {cls.name: cls for cls in (KIVI, OTT)}
MODIFIERS = {cls.name: cls for cls in (CaliDrop,)}
