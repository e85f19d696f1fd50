// What C++ readers of a TransIP artifact share (transip-bench, pair_style transip): element symbols and a
// lookup into the artifact's metadata JSON (transip_metadata.json, written by transip export).
#pragma once

#include <string>

namespace transip {

inline const char* const kElementSymbols[] = {
    "X",  "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si", "P",  "S",  "Cl", "Ar",
    "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb",
    "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe"};
inline constexpr int kNumElementSymbols = sizeof(kElementSymbols) / sizeof(kElementSymbols[0]);

// Atomic number of an element symbol, 0 if unknown.
inline int atomic_number(const std::string& symbol) {
  for (int z = 1; z < kNumElementSymbols; ++z)
    if (symbol == kElementSymbols[z]) return z;
  return 0;
}

// The text after "key": in the metadata JSON: a top-level scalar (quotes removed) or the inside of a list.
// A flat search is enough for the top-level fields these readers need; empty if the key is absent.
inline std::string metadata_value(const std::string& json, const std::string& key) {
  const size_t at = json.find("\"" + key + "\":");
  if (at == std::string::npos) return "";
  size_t start = at + key.size() + 3;
  while (start < json.size() && json[start] == ' ') ++start;
  if (start < json.size() && json[start] == '[') return json.substr(start + 1, json.find(']', start) - start - 1);
  size_t end = start;
  while (end < json.size() && json[end] != ',' && json[end] != '\n' && json[end] != '}') ++end;
  std::string value = json.substr(start, end - start);
  if (value.size() >= 2 && value.front() == '"') value = value.substr(1, value.size() - 2);
  return value;
}

}  // namespace transip
