"""ddln_jax: training dynamics of Deep Diagonal Linear Networks in JAX."""

import importlib.metadata as _metadata

from ._bias import ImplicitBias as ImplicitBias
from ._bias import implicit_bias as implicit_bias
from ._bias import min_l1_interpolator as min_l1_interpolator
from ._bias import min_l2_interpolator as min_l2_interpolator
from ._bias import theorem1_bound as theorem1_bound
from ._cache import enable_compilation_cache as enable_compilation_cache
from ._discrete import sharpness as sharpness
from ._discrete import train as train
from ._flow import DEFAULT_MAX_STEPS as DEFAULT_MAX_STEPS
from ._flow import gradient_flow as gradient_flow
from ._flow import log_times as log_times
from ._gd_bias import GDBias as GDBias
from ._gd_bias import gd_bias as gd_bias
from ._gd_bias import step_factors as step_factors
from ._geometry import ZeroCrossing as ZeroCrossing
from ._geometry import conservation_residual as conservation_residual
from ._geometry import corollary1_sigma as corollary1_sigma
from ._geometry import empirical_rate as empirical_rate
from ._geometry import lambda_min_along as lambda_min_along
from ._geometry import metric as metric
from ._geometry import metric_along as metric_along
from ._geometry import metric_diag as metric_diag
from ._geometry import sigma as sigma
from ._geometry import theorem2_bound as theorem2_bound
from ._geometry import zero_crossings as zero_crossings
from ._lie import Commuting as Commuting
from ._lie import ConservationLaws as ConservationLaws
from ._lie import LieRank as LieRank
from ._lie import count_conservation_laws as count_conservation_laws
from ._lie import is_commuting as is_commuting
from ._lie import lie_rank as lie_rank
from ._loss import Exponential as Exponential
from ._loss import FunctionLoss as FunctionLoss
from ._loss import LeastSquares as LeastSquares
from ._loss import Logistic as Logistic
from ._margin import MarginPath as MarginPath
from ._margin import MaxMargin as MaxMargin
from ._margin import kkt_residual as kkt_residual
from ._margin import margin as margin
from ._margin import margin_along as margin_along
from ._margin import max_margin as max_margin
from ._mirror import AbstractMirrorMap as AbstractMirrorMap
from ._mirror import MirrorMap as MirrorMap
from ._mirror import ShallowMirrorMap as ShallowMirrorMap
from ._mirror import TiedMirrorMap as TiedMirrorMap
from ._mirror import YunMirrorMap as YunMirrorMap
from ._network import check_assumption_a as check_assumption_a
from ._network import from_reduced as from_reduced
from ._network import init_gaussian as init_gaussian
from ._network import init_yun as init_yun
from ._network import init_zero_first as init_zero_first
from ._network import minimal_layer as minimal_layer
from ._network import reduced_gap as reduced_gap
from ._network import theta as theta
from ._network import to_reduced as to_reduced
from ._parameterize import difference as difference
from ._parameterize import tied as tied
from ._reduced import mirror_flow as mirror_flow
from ._reduced import reduced_flow as reduced_flow
from ._saddles import Plateaus as Plateaus
from ._saddles import SaddlePath as SaddlePath
from ._saddles import detect_plateaus as detect_plateaus
from ._saddles import saddle_path as saddle_path
from ._saddles import saddle_thresholds as saddle_thresholds
from ._stability import StableStep as StableStep
from ._stability import interpolator_sharpness as interpolator_sharpness
from ._stability import max_stable_step as max_stable_step
from ._stochastic import momentum_flow as momentum_flow
from ._stochastic import stochastic_flow as stochastic_flow
from ._sweep import SweepResult as SweepResult
from ._sweep import load_sweep as load_sweep
from ._sweep import per_seed as per_seed
from ._sweep import sweep as sweep
from ._trajectory import RESULTS as RESULTS
from ._trajectory import Result as Result
from ._trajectory import Trajectory as Trajectory
from ._trajectory import result_message as result_message
from ._versions import show_versions as show_versions
from ._weight_decay import WeightDecayLimit as WeightDecayLimit
from ._weight_decay import weight_decay_limit as weight_decay_limit

try:
    __version__ = _metadata.version("ddln_jax")
except _metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"
