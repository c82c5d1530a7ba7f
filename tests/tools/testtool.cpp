// kvq-testtool: exposes engine internals to the Python reference tests.
//   logits  -m MODEL --tokens-json F --out F.npy   one ragged batch, every row's logits
//   dequant -m MODEL --tensor NAME --out F.npy     one tensor dequantized to fp32
//   tokenize -m MODEL --requests F --out F         one answer line per request line:
//     encode <parse_special 0|1> <hex text>  ->  "<ids, space-separated>\t<hex of decode(ids)>"
//     decode <id> <id> ...                    ->  "<hex of decode(ids)>"
//     chat <hex user message>                 ->  "<hex of apply_chat_template(message)>"
//     (hex keeps invalid UTF-8 and newlines intact); stderr gets the total encode time.
// .npy output is float32, C order.
#include <chrono>
#include <fstream>
#include <iostream>
#include <sstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "cpu/blas_kernels.h"
#include "cpu/cpu_backend.h"
#include "engine/loaded_model.h"
#include "kv/page_tables.h"
#include "model/dequant.h"
#include "model/gguf.h"
#include "tokenizer/tokenizer.h"

namespace {

void write_npy(const std::string& path, const std::vector<int64_t>& shape, const std::vector<float>& data) {
  std::string dims;
  for (int64_t d : shape) dims += fmt::format("{}, ", d);
  if (shape.size() > 1) dims.erase(dims.size() - 2);
  std::string header = fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}", dims);
  // Magic (6) + version (2) + length (2) + header + padding + '\n' is a multiple of 64.
  header.append(63 - (10 + header.size()) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  if (!out) kvq::fail("cannot write '{}'", path);
  out.write("\x93NUMPY\x01\x00", 8);
  const uint16_t length = static_cast<uint16_t>(header.size());
  out.write(reinterpret_cast<const char*>(&length), 2);
  out << header;
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(float)));
}

int logits(const std::string& model_path, const std::string& tokens_path, const std::string& out_path, int page) {
  kvq::LoadedModel model(model_path, true);
  std::ifstream in(tokens_path);
  if (!in) kvq::fail("cannot read '{}'", tokens_path);
  const auto batches = nlohmann::json::parse(in).get<std::vector<std::vector<int32_t>>>();
  int64_t total = 0;
  for (const auto& seq : batches) total += static_cast<int64_t>(seq.size());
  // Pages scattered: a dummy sequence takes every other page first.
  const int32_t n_pages = 2 * static_cast<int32_t>((total + page - 1) / page + batches.size()) + 2;
  kvq::PageTables tables(n_pages, page);
  kvq::CpuBackend backend(model.config, model.weights, n_pages, page);
  kvq::StepBatch batch;
  for (size_t s = 0; s < batches.size(); ++s) {
    const int32_t seq = static_cast<int32_t>(s);
    const int32_t spacer = static_cast<int32_t>(batches.size() + s);
    tables.add_sequence(seq);
    tables.add_sequence(spacer);
    for (int64_t need = 0; need < static_cast<int64_t>(batches[s].size()); need += page) {
      tables.reserve(seq, need + 1);
      tables.reserve(spacer, tables.capacity(spacer) + 1);
    }
    batch.add_chunk(seq, 0, batches[s].data(), static_cast<int32_t>(batches[s].size()), true);
  }
  std::vector<float> out;
  backend.forward(batch, tables, out);
  write_npy(out_path, {total, model.config.vocab}, out);
  return 0;
}

int dequant(const std::string& model_path, const std::string& name, const std::string& out_path) {
  kvq::GgufFile file = kvq::GgufFile::open(model_path);
  const kvq::GgufTensorInfo& info = file.tensor(name);
  std::vector<float> out(info.n_elements);
  kvq::dequantize(info.type, file.tensor_bytes(info), out);
  write_npy(out_path, std::vector<int64_t>(info.dims.rbegin(), info.dims.rend()), out);
  return 0;
}

std::string from_hex(const std::string& hex) {
  if (hex.size() % 2 != 0) kvq::fail("odd-length hex '{}'", hex);
  std::string bytes;
  for (size_t i = 0; i < hex.size(); i += 2) bytes.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return bytes;
}

std::string to_hex(const std::string& bytes) {
  std::string hex;
  for (const unsigned char c : bytes) hex += fmt::format("{:02x}", c);
  return hex;
}

int tokenize(const std::string& model_path, const std::string& requests_path, const std::string& out_path) {
  const kvq::Tokenizer tokenizer(kvq::Tokenizer::vocab_from_gguf(kvq::GgufFile::open(model_path)));
  std::ifstream in(requests_path);
  if (!in) kvq::fail("cannot read '{}'", requests_path);
  std::ofstream out(out_path);
  if (!out) kvq::fail("cannot write '{}'", out_path);
  double encode_seconds = 0;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string kind;
    fields >> kind;
    if (kind == "encode") {
      int parse_special = 0;
      std::string text_hex;
      fields >> parse_special >> text_hex;
      const std::string text = from_hex(text_hex);
      const auto start = std::chrono::steady_clock::now();
      const std::vector<int32_t> ids = tokenizer.encode(text, parse_special != 0);
      encode_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      out << fmt::format("{}", fmt::join(ids, " ")) << '\t' << to_hex(tokenizer.decode(ids)) << '\n';
    } else if (kind == "decode") {
      std::vector<int32_t> ids;
      for (int32_t id; fields >> id;) ids.push_back(id);
      out << to_hex(tokenizer.decode(ids)) << '\n';
    } else if (kind == "chat") {
      std::string message_hex;
      fields >> message_hex;
      out << to_hex(tokenizer.apply_chat_template(from_hex(message_hex))) << '\n';
    } else {
      kvq::fail("unknown tokenize request '{}'", kind);
    }
  }
  fmt::print(stderr, "encode_seconds {:.3f}\n", encode_seconds);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  kvq::reexec_with_fast_blas_kernels(argv);
  CLI::App app{"kvq-testtool"};
  app.require_subcommand(1);
  std::string model, tokens, out, tensor, requests;
  int page = 16;
  CLI::App* logits_cmd = app.add_subcommand("logits");
  logits_cmd->add_option("-m,--model", model)->required();
  logits_cmd->add_option("--tokens-json", tokens)->required();
  logits_cmd->add_option("--out", out)->required();
  logits_cmd->add_option("--page", page);
  CLI::App* dequant_cmd = app.add_subcommand("dequant");
  dequant_cmd->add_option("-m,--model", model)->required();
  dequant_cmd->add_option("--tensor", tensor)->required();
  dequant_cmd->add_option("--out", out)->required();
  CLI::App* tokenize_cmd = app.add_subcommand("tokenize");
  tokenize_cmd->add_option("-m,--model", model)->required();
  tokenize_cmd->add_option("--requests", requests)->required();
  tokenize_cmd->add_option("--out", out)->required();
  CLI11_PARSE(app, argc, argv);
  try {
    if (tokenize_cmd->parsed()) return tokenize(model, requests, out);
    return logits_cmd->parsed() ? logits(model, tokens, out, page) : dequant(model, tensor, out);
  } catch (const std::exception& e) {
    fmt::print(stderr, "kvq-testtool: error: {}\n", e.what());
    return 1;
  }
}
