"""Element symbols by atomic number (index 0 is the placeholder "X"): the one element table of the project.

Python reads it from here (transip.model re-exports it), and the build generates the C++ header
`transip/element_symbols.h` from this file (cpp/generate_element_symbols.py, run by CMake whenever this file
changes), so transip-bench and pair_style transip know exactly the same elements. Keep this module free of
imports: the generator executes it without importing the package (which needs torch).
"""

ELEMENT_SYMBOLS = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr Rb Sr Y "
    "Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re "
    "Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg "
    "Cn Nh Fl Mc Lv Ts Og").split()
