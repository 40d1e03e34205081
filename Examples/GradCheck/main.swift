import Kappa
