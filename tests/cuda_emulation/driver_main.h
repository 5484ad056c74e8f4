// What both emulator drivers share: errors, raw files, faults.txt, and main(): run one case
// directory, exit 0 when it ran (faults or not), else 1 with a message.
#pragma once

#include <cstddef>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>

#include "cuda_emulation.h"

namespace cuda_emu_driver {

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error(what); }

// A raw input of exactly `bytes` bytes, in emulated device memory (a guard page after it).
inline void* read_file(const std::string& path, size_t bytes) {
  void* data = cuda_emu::device_alloc(bytes);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) fail("cannot read " + path);
  const size_t got = std::fread(data, 1, bytes, f);
  const bool longer = std::fgetc(f) != EOF;
  std::fclose(f);
  if (got != bytes || longer) fail(path + " does not hold " + std::to_string(bytes) + " bytes");
  return data;
}

inline void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(data, 1, bytes, f) != bytes || std::fclose(f) != 0) {
    fail("cannot write " + path);
  }
}

// faults.txt: the number of faults the emulator saw, then their messages.
inline void write_faults(const std::string& path) {
  std::ofstream out(path);
  out << cuda_emu::faults().count() << "\n";
  for (const std::string& m : cuda_emu::faults().messages()) out << m << "\n";
  if (!out) fail("cannot write " + path);
}

// usage: NAME CASE_DIR; runs run_case(CASE_DIR), then writes CASE_DIR/faults.txt.
inline int main(int argc, char** argv, const char* name, void (*run_case)(const std::string&)) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASE_DIR\n", argv[0]);
    return 1;
  }
  try {
    run_case(argv[1]);
    write_faults(std::string(argv[1]) + "/faults.txt");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 1;
  }
  return 0;
}

}  // namespace cuda_emu_driver
