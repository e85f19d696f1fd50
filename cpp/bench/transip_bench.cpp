// transip-bench: evaluate an exported TransIP artifact with libtorch alone (no Python), for timing and for
// checking that C++ gives the same numbers as Python.
//
//   transip-bench MODEL.pt STRUCTURE.xyz [--warmup N] [--repeat N] [--threads N] [--charge Q] [--spin S]
//                 [--json FILE]
//
// Reads the structure from (extended) XYZ: species and positions, and from the comment line Lattice="...",
// pbc="T T T", charge=Q and spin=S when present. Calls the artifact's `compute` method (its own neighbour
// list; energy and forces) `warmup` times untimed and `repeat` times timed, then prints the time per
// evaluation, atoms x evaluations per second, peak resident memory, and the energy and forces of the last
// evaluation as one JSON object (to --json FILE, or to standard output after the summary). Like the MD
// engines (pair_style transip, `transip md`), it keeps freed memory in the heap (transip::keep_freed_memory), so
// its times are those of an engine's steps, not of page faults on every evaluation's large tensors.
#include <ATen/Parallel.h>
#include <sys/resource.h>
#include <torch/script.h>
#include <transip/artifact_metadata.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace transip {
std::string library_marker();  // from libtransip_ops: linking it registers the native ops
bool keep_freed_memory();       // see cpp/src/ops.cpp
}

namespace {

struct Structure {
  std::vector<int64_t> numbers;
  std::vector<double> positions;
  std::vector<double> cell = std::vector<double>(9, 0.0);
  bool pbc[3] = {false, false, false};
  int64_t charge = 0;
  int64_t spin = 1;
};

// Value of key=value or key="v a l u e" in an extended XYZ comment line; empty if absent.
std::string comment_value(const std::string& comment, const std::string& key) {
  size_t at = 0;
  while ((at = comment.find(key + "=", at)) != std::string::npos) {
    if (at == 0 || comment[at - 1] == ' ') break;
    at += key.size();
  }
  if (at == std::string::npos) return "";
  size_t start = at + key.size() + 1;
  if (start < comment.size() && comment[start] == '"') {
    const size_t end = comment.find('"', start + 1);
    return comment.substr(start + 1, end == std::string::npos ? std::string::npos : end - start - 1);
  }
  const size_t end = comment.find(' ', start);
  return comment.substr(start, end == std::string::npos ? std::string::npos : end - start);
}

Structure read_xyz(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open structure file " + path);
  std::string line;
  if (!std::getline(in, line)) throw std::runtime_error(path + ": empty file");
  int64_t count = 0;
  try {
    count = std::stoll(line);
  } catch (const std::exception&) {
    throw std::runtime_error(path + ": the first line must be the number of atoms, got '" + line + "'");
  }
  std::string comment;
  std::getline(in, comment);
  Structure s;
  const std::string lattice = comment_value(comment, "Lattice");
  if (!lattice.empty()) {
    std::istringstream values(lattice);
    for (double& x : s.cell)
      if (!(values >> x)) throw std::runtime_error(path + ": Lattice must have 9 numbers");
    s.pbc[0] = s.pbc[1] = s.pbc[2] = true;
    const std::string pbc = comment_value(comment, "pbc");
    if (!pbc.empty()) {
      std::istringstream flags(pbc);
      for (bool& p : s.pbc) {
        std::string f;
        flags >> f;
        p = f == "T" || f == "True" || f == "true" || f == "1";
      }
    }
  }
  if (!comment_value(comment, "charge").empty()) s.charge = std::stoll(comment_value(comment, "charge"));
  if (!comment_value(comment, "spin").empty()) s.spin = std::stoll(comment_value(comment, "spin"));
  for (int64_t i = 0; i < count; ++i) {
    if (!std::getline(in, line)) throw std::runtime_error(path + ": expected " + std::to_string(count) + " atoms");
    std::istringstream fields(line);
    std::string symbol;
    double x, y, z;
    if (!(fields >> symbol >> x >> y >> z)) throw std::runtime_error(path + ": cannot parse atom line '" + line + "'");
    const int number = transip::atomic_number(symbol);
    if (number == 0) throw std::runtime_error(path + ": unknown element symbol '" + symbol + "'");
    s.numbers.push_back(number);
    s.positions.insert(s.positions.end(), {x, y, z});
  }
  return s;
}

// Peak resident memory of this process. VmHWM belongs to the process image after exec; getrusage's
// ru_maxrss would carry over the high-water mark of a parent that forked us (as Python's subprocess does).
double peak_resident_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0;
}

struct Options {
  std::string model, structure, json;
  int warmup = 3, repeat = 20, threads = 0;
  int64_t charge = INT64_MIN, spin = INT64_MIN;
};

Options parse(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("option " + a + " needs a value");
      return argv[++i];
    };
    if (a == "--warmup") o.warmup = std::stoi(next());
    else if (a == "--repeat") o.repeat = std::stoi(next());
    else if (a == "--threads") o.threads = std::stoi(next());
    else if (a == "--charge") o.charge = std::stoll(next());
    else if (a == "--spin") o.spin = std::stoll(next());
    else if (a == "--json") o.json = next();
    else if (a == "-h" || a == "--help") throw std::runtime_error("");
    else if (!a.empty() && a[0] == '-') throw std::runtime_error("unknown option " + a);
    else positional.push_back(a);
  }
  if (positional.size() != 2) throw std::runtime_error("expected MODEL.pt and STRUCTURE.xyz");
  if (o.repeat < 1 || o.warmup < 0) throw std::runtime_error("--repeat must be >= 1 and --warmup >= 0");
  o.model = positional[0];
  o.structure = positional[1];
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse(argc, argv);
  } catch (const std::exception& e) {
    if (std::string(e.what()).size()) std::cerr << "transip-bench: error: " << e.what() << "\n";
    std::cerr << "usage: transip-bench MODEL.pt STRUCTURE.xyz [--warmup N] [--repeat N] [--threads N] "
                 "[--charge Q] [--spin S] [--json FILE]\n";
    return 2;
  }
  try {
    if (opt.threads > 0) at::set_num_threads(opt.threads);
    transip::keep_freed_memory();
    Structure s = read_xyz(opt.structure);
    if (opt.charge != INT64_MIN) s.charge = opt.charge;
    if (opt.spin != INT64_MIN) s.spin = opt.spin;

    torch::jit::ExtraFilesMap extra{{transip::contract::kMetadataFile, ""}};
    torch::jit::Module module;
    try {
      module = torch::jit::load(opt.model, torch::kCPU, extra);
    } catch (const c10::Error& e) {
      throw std::runtime_error("cannot load artifact " + opt.model + ": " + transip::exception_message(e));
    }
    const std::string& metadata = extra[transip::contract::kMetadataFile];
    const std::string problem = transip::format_problem(metadata, opt.model, "transip-bench");
    if (!problem.empty()) throw std::runtime_error(problem);
    const auto dtype = transip::metadata_path(metadata, transip::contract::kKeyDtype) == "float32" ? torch::kFloat32
                                                                                                  : torch::kFloat64;

    const int64_t n = static_cast<int64_t>(s.numbers.size());
    torch::Tensor positions = torch::from_blob(s.positions.data(), {n, 3}, torch::kFloat64).to(dtype);
    torch::Tensor numbers = torch::from_blob(s.numbers.data(), {n}, torch::kInt64).clone();
    torch::Tensor cell = torch::from_blob(s.cell.data(), {3, 3}, torch::kFloat64).to(dtype);
    torch::Tensor pbc = torch::tensor({s.pbc[0], s.pbc[1], s.pbc[2]}, torch::kBool);
    std::vector<torch::jit::IValue> inputs{positions, numbers, cell, pbc, s.charge, s.spin, false};
    auto compute = module.get_method("compute");

    c10::IValue last;
    for (int i = 0; i < opt.warmup; ++i) last = compute(inputs);
    std::vector<double> seconds;
    for (int i = 0; i < opt.repeat; ++i) {
      const auto start = std::chrono::steady_clock::now();
      last = compute(inputs);
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    std::vector<double> sorted = seconds;
    std::sort(sorted.begin(), sorted.end());
    const double median = sorted[sorted.size() / 2];
    const double mean = std::accumulate(seconds.begin(), seconds.end(), 0.0) / seconds.size();
    const double peak_mib = peak_resident_mib();

    const auto result = last.toGenericDict();
    const double energy = result.at("energy").toTensor().to(torch::kFloat64).item<double>();
    const torch::Tensor forces = result.at("forces").toTensor().to(torch::kFloat64).contiguous();
    std::cerr << "transip-bench: " << transip::library_marker() << ", " << at::get_num_threads() << " threads\n"
              << "  " << n << " atoms, " << opt.repeat << " evaluations after " << opt.warmup << " warm-up\n"
              << std::fixed << std::setprecision(3) << "  time per evaluation: median " << 1e3 * median
              << " ms, mean " << 1e3 * mean << " ms\n"
              << "  " << std::setprecision(0) << n / median << " atom-evaluations per second\n"
              << std::setprecision(1) << "  peak memory " << peak_mib << " MiB\n";

    std::ostringstream json;
    json << std::setprecision(17) << "{\"atoms\": " << n << ", \"evaluations\": " << opt.repeat
         << ", \"seconds_median\": " << median << ", \"seconds_mean\": " << mean
         << ", \"atom_evaluations_per_second\": " << n / median << ", \"peak_rss_mib\": " << peak_mib
         << ", \"threads\": " << at::get_num_threads() << ", \"dtype\": \""
         << (dtype == torch::kFloat32 ? "float32" : "float64") << "\", \"energy\": " << energy << ", \"forces\": [";
    const double* f = forces.data_ptr<double>();
    for (int64_t i = 0; i < 3 * n; ++i) json << (i ? ", " : "") << f[i];
    json << "]}";
    if (!opt.json.empty()) {
      std::ofstream out(opt.json);
      out << json.str() << "\n";
      if (!out) throw std::runtime_error("cannot write " + opt.json);
    } else {
      std::cout << json.str() << std::endl;
    }
  } catch (const std::exception& e) {  // c10::Error, or a failed model call (JITException): the model's own message
    std::cerr << "transip-bench: error: " << transip::exception_message(e) << "\n";
    return 1;
  }
  return 0;
}
