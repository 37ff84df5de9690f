"""The VT-ADL model in pure torch: no optimiser, no loss weights, no device names."""

from vtadl.model.mdn import Mixture, MixtureDensityHead
from vtadl.model.vtadl import VTADL, VTADLOutput, build_model, create_model

__all__ = ["VTADL", "VTADLOutput", "Mixture", "MixtureDensityHead", "build_model", "create_model"]
