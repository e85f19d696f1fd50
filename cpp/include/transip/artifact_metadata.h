// What C++ readers of a TransIP artifact share (transip-bench, pair_style transip): element symbols, lookups into
// the artifact's metadata JSON (contract::kMetadataFile, written by transip export) by the contract's key paths,
// the format check, and the model's own message out of a TorchScript exception.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

// kElementSymbols, kNumElementSymbols: generated at build time from transip/elements.py, the table Python uses
// (cpp/generate_element_symbols.py), so that C++ and Python know the same elements.
#include "transip/element_symbols.h"
// transip::contract::k...: generated at build time from export/contract.py, the module the exporter writes with
// (cpp/generate_contract.py): format version, metadata file and key paths, unit factors.
#include "transip/contract.h"

namespace transip {

// Atomic number of an element symbol, 0 if unknown.
inline int atomic_number(const std::string& symbol) {
  for (int z = 1; z < kNumElementSymbols; ++z)
    if (symbol == kElementSymbols[z]) return z;
  return 0;
}

// Symbol of an atomic number; "Z=<z>" outside the table, so that no caller indexes past its end.
inline std::string element_symbol(int64_t z) {
  if (z >= 1 && z < kNumElementSymbols) return kElementSymbols[z];
  return "Z=" + std::to_string(z);
}

// Where the value of "key": starts in a JSON text: the first occurrence at any depth (depth 0), or only among the
// fields of the outermost object (depth 1; strings, nested objects and lists skipped). npos if absent.
inline size_t metadata_key(const std::string& json, const std::string& key, int depth = 0) {
  const std::string quoted = "\"" + key + "\"";
  int level = 0;
  for (size_t i = 0; i < json.size(); ++i) {
    const char c = json[i];
    if (c == '{' || c == '[') {
      ++level;
    } else if (c == '}' || c == ']') {
      --level;
    } else if (c == '"') {
      if ((depth == 0 || level == depth) && json.compare(i, quoted.size(), quoted) == 0) {
        size_t colon = i + quoted.size();
        while (colon < json.size() && (json[colon] == ' ' || json[colon] == '\n')) ++colon;
        if (colon < json.size() && json[colon] == ':') {
          size_t start = colon + 1;
          while (start < json.size() && (json[start] == ' ' || json[start] == '\n')) ++start;
          return start;
        }
      }
      for (++i; i < json.size() && json[i] != '"'; ++i)  // skip the string
        if (json[i] == '\\') ++i;
    }
  }
  return std::string::npos;
}

// The value text starting at `start`: a scalar (quotes removed) or the inside of a list.
inline std::string metadata_value_at(const std::string& json, size_t start) {
  if (start == std::string::npos) return "";
  if (start < json.size() && json[start] == '[') return json.substr(start + 1, json.find(']', start) - start - 1);
  size_t end = start;
  while (end < json.size() && json[end] != ',' && json[end] != '\n' && json[end] != '}') ++end;
  std::string value = json.substr(start, end - start);
  if (value.size() >= 2 && value.front() == '"') value = value.substr(1, value.size() - 2);
  return value;
}

// The value of a field of the outermost object only ("atomic_numbers" of the model, not of its trained_domain).
inline std::string metadata_field(const std::string& json, const std::string& key) {
  return metadata_value_at(json, metadata_key(json, key, 1));
}

// The text {...} of an object field of the outermost object; empty if absent or not an object (null: e.g.
// "trained_domain" of an artifact exported before it was recorded). Its own fields: metadata_field.
inline std::string metadata_object(const std::string& json, const std::string& key) {
  const size_t start = metadata_key(json, key, 1);
  if (start == std::string::npos || json[start] != '{') return "";
  int depth = 0;
  for (size_t i = start; i < json.size(); ++i) {
    const char c = json[i];
    if (c == '"') {
      for (++i; i < json.size() && json[i] != '"'; ++i)
        if (json[i] == '\\') ++i;
    } else if (c == '{') {
      ++depth;
    } else if (c == '}' && --depth == 0) {
      return json.substr(start, i - start + 1);
    }
  }
  return "";
}

// The value at a path of keys through nested objects, separated by dots (contract::kKeyNativeOpsVersion is
// "native_ops.version"): a scalar (quotes removed) or a list's inside. Empty if a step is absent or null.
inline std::string metadata_path(const std::string& json, const std::string& path) {
  std::string scope = json;
  size_t start = 0;
  for (size_t dot = path.find('.'); dot != std::string::npos; start = dot + 1, dot = path.find('.', start))
    scope = metadata_object(scope, path.substr(start, dot - start));
  return metadata_field(scope, path.substr(start));
}

// Why an artifact's metadata cannot be read by this build (empty if it can): not TransIP metadata, or a format
// version other than contract::kFormatVersion. `reader` names the program in the message.
inline std::string format_problem(const std::string& json, const std::string& path, const std::string& reader) {
  if (metadata_path(json, contract::kKeyFormat) != contract::kFormat)
    return path + " has no TransIP metadata (" + contract::kMetadataFile + "); export the model with `transip export`";
  const std::string version = metadata_path(json, contract::kKeyFormatVersion);
  const std::string expected = std::to_string(contract::kFormatVersion);
  if (version == expected) return "";
  if (version.find_first_not_of("0123456789") == std::string::npos && !version.empty() &&
      std::stoll(version) < contract::kFormatVersion)
    return path + " has artifact format version " + version + ", older than the version " + expected + " that " +
           reader + " reads (its methods differ); export it again with `transip export CHECKPOINT -o " + path + "`";
  return path + " has artifact format version " + version + ", but " + reader + " reads version " + expected +
         ": upgrade transip, or export it again with this transip";
}

// The integers of a list's inside as metadata_path returns it ("-1, 0, 1", with any whitespace).
inline std::vector<int64_t> metadata_integers(const std::string& list) {
  std::vector<int64_t> values;
  std::istringstream items(list);
  for (std::string item; std::getline(items, item, ',');)
    if (item.find_first_not_of(" \n\t") != std::string::npos) values.push_back(std::stoll(item));
  return values;
}

// The model's own message in the text of a failed TorchScript call. The interpreter puts a header ("The following
// operation failed in the TorchScript interpreter.") and two tracebacks of indented code before the exception
// line that says what went wrong ("builtins.ValueError: total charge ..." or "RuntimeError: ..."), so the first
// line says nothing. This returns the exception line and any lines after it, joined by spaces, without
// "builtins."; text without a TorchScript traceback (an error of libtorch itself) gives its first line.
inline std::string model_error_message(const std::string& what) {
  std::vector<std::string> lines;
  std::istringstream in(what);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  size_t traceback = lines.size();
  for (size_t i = 0; i < lines.size(); ++i)
    if (lines[i].rfind("Traceback of TorchScript", 0) == 0) traceback = i;
  size_t first = lines.size();
  if (traceback < lines.size()) {
    // Traceback lines ("  File ...", code) are indented; the exception line starts at the margin.
    for (size_t i = traceback + 1; i < lines.size() && first == lines.size(); ++i)
      if (!lines[i].empty() && lines[i][0] != ' ') first = i;
  } else {
    for (size_t i = 0; i < lines.size() && first == lines.size(); ++i)
      if (lines[i].find_first_not_of(" \t") != std::string::npos) first = i;
  }
  if (first == lines.size()) return what;
  std::string message;
  const size_t last = traceback < lines.size() ? lines.size() : first + 1;
  for (size_t i = first; i < last; ++i) {
    const size_t begin = lines[i].find_first_not_of(" \t");
    if (begin == std::string::npos) continue;
    if (!message.empty()) message += ' ';
    message += lines[i].substr(begin);
  }
  if (message.rfind("builtins.", 0) == 0) message.erase(0, 9);
  return message;
}

// What to show of an exception from libtorch: c10::Error without its C++ backtrace, and for a failed TorchScript
// call the model's own message rather than the interpreter's header line (model_error_message).
inline std::string exception_message(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  return model_error_message(c10_error ? c10_error->what_without_backtrace() : e.what());
}

}  // namespace transip
