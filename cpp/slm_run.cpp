// slm-run: greedy generation from an slm-export cache graph, without Python.
//
//   slm-run --model export/model_kv.pt2 --ids 7454,2402,257,640 --max-new-tokens 20
//   slm-run --model export/model_kv.ts  --ids 7454,2402,257,640 --max-new-tokens 20
//
// Prints the new token ids (comma-separated) on stdout; timings on stderr. Options:
// --device cpu|cuda (default cpu), --stop-id N (default 50256 = <|endoftext|>; -1: never stop).
//
// model_kv.pt2, AOTInductor (torch.export + aoti_compile_and_package): the static-cache
//   signature of slm_export/artifacts/kv_layout.py. The caller owns one window per layer,
//   which the model writes in place:
//   (input_ids [B,T], attention_mask [B,W], input_pos [T], logits_index [K],
//    cache.{i}.key, cache.{i}.value [B,n_head,W,head_dim]...) -> logits [B,K,vocab]
// model_kv.ts, TorchScript (deprecated upstream, kept for existing users): the functional
//   signature optimum and onnxruntime-genai share:
//   (input_ids [B,T], attention_mask [B,P+T], position_ids [B,T],
//    past (tuple of 2*n_layer [B,n_head,P,head_dim]), logits_to_keep [])
//   -> (logits [B,K,vocab], present.0.key, present.0.value, ... [B,n_head,P+T,head_dim])
//
// The loop is slm_export/runtime/generation.py's: prefill the prompt (its last W tokens), then
// decode one token at a time; when the window of W = block_size positions is full, keep the
// last W/2 tokens and prefill them again. Greedy (argmax); stops at the stop id.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int64_t kEndOfText = 50256;  // the default stop id

struct Config {
  int64_t block_size = 0, n_layer = 0, n_head = 0, head_dim = 0;
};

// An integer field of the model_config JSON in a file's metadata ("n_head": 4), also where
// that JSON is itself inside a JSON string (\"n_head\": 4), as in model_kv.ts's config.json.
int64_t config_int(const std::string& json, const std::string& key) {
  for (size_t at = json.find(key); at != std::string::npos; at = json.find(key, at + 1)) {
    if (at == 0 || json[at - 1] != '"') continue;
    size_t p = at + key.size();
    while (p < json.size() && std::string("\\\": ").find(json[p]) != std::string::npos) ++p;
    if (p < json.size() && std::isdigit(static_cast<unsigned char>(json[p])))
      return std::stoll(json.substr(p));
  }
  throw std::runtime_error("the model file's metadata has no " + key + " (not an slm-export file?)");
}

Config parse_config(const std::string& json) {
  Config c;
  c.block_size = config_int(json, "block_size");
  c.n_layer = config_int(json, "n_layer");
  c.n_head = config_int(json, "n_head");
  c.head_dim = config_int(json, "n_embd") / c.n_head;
  return c;
}

// What the loop needs from a model: both calls return the logits after the last new token
// (B, vocab). prefill starts a fresh window; decode appends to it.
class CacheModel {
 public:
  virtual ~CacheModel() = default;
  virtual torch::Tensor prefill(const torch::Tensor& ids) = 0;
  virtual torch::Tensor decode(const torch::Tensor& ids) = 0;
  Config config;
};

class AotiModel : public CacheModel {
 public:
  AotiModel(const std::string& path, torch::Device device)
      : loader_(path, "model", false, 1, device.has_index() ? device.index() : -1), device_(device) {
    auto metadata = loader_.get_metadata();
    if (metadata["AOTI_DEVICE_KEY"] != torch::Device(device.type()).str())
      throw std::runtime_error(path + " was compiled for " + metadata["AOTI_DEVICE_KEY"] +
                               ", not " + device.str());
    config = parse_config(metadata.at("model_config"));
  }

  torch::Tensor prefill(const torch::Tensor& ids) override {
    int64_t batch = ids.size(0);
    if (cache_.empty() || cache_[0].size(0) != batch) {  // stale slots need no reset: masked
      auto zeros = torch::zeros({batch, config.n_head, config.block_size, config.head_dim},
                                torch::dtype(torch::kFloat).device(device_));
      cache_.assign(2 * config.n_layer, zeros);
      for (auto& t : cache_) t = torch::zeros_like(zeros);
      mask_ = torch::ones({batch, config.block_size}, torch::dtype(torch::kLong).device(device_));
    }
    length_ = 0;
    return decode(ids);
  }

  torch::Tensor decode(const torch::Tensor& ids) override {
    int64_t n = ids.size(1);
    auto opts = torch::dtype(torch::kLong).device(device_);
    std::vector<torch::Tensor> inputs = {ids, mask_, torch::arange(length_, length_ + n, opts),
                                         torch::full({1}, n - 1, opts)};
    inputs.insert(inputs.end(), cache_.begin(), cache_.end());
    auto logits = loader_.run(inputs)[0];  // (B, 1, vocab); the cache was written in place
    length_ += n;
    return logits.select(1, -1);
  }

 private:
  torch::inductor::AOTIModelPackageLoader loader_;
  torch::Device device_;
  std::vector<torch::Tensor> cache_;  // cache.{i}.key, cache.{i}.value
  torch::Tensor mask_;
  int64_t length_ = 0;
};

class TorchScriptModel : public CacheModel {
 public:
  TorchScriptModel(const std::string& path, torch::Device device) : device_(device) {
    torch::jit::ExtraFilesMap extra{{"config.json", ""}};
    module_ = torch::jit::load(path, device, extra);
    module_.eval();
    config = parse_config(extra["config.json"]);
  }

  torch::Tensor prefill(const torch::Tensor& ids) override {
    auto empty = torch::zeros({ids.size(0), config.n_head, 0, config.head_dim},
                              torch::dtype(torch::kFloat).device(device_));
    past_.assign(2 * config.n_layer, empty);
    return decode(ids);
  }

  torch::Tensor decode(const torch::Tensor& ids) override {
    int64_t total = past_[0].size(2) + ids.size(1);
    auto opts = torch::dtype(torch::kLong).device(device_);
    auto mask = torch::ones({ids.size(0), total}, opts);
    auto positions = (mask.cumsum(1) - 1).clamp_min(0).slice(1, total - ids.size(1));
    std::vector<c10::IValue> past(past_.begin(), past_.end());
    auto out = module_.forward({ids, mask, positions, c10::ivalue::Tuple::create(std::move(past)),
                                torch::scalar_tensor(1, opts)}).toTuple();
    for (size_t i = 0; i < past_.size(); ++i) past_[i] = out->elements()[i + 1].toTensor();
    return out->elements()[0].toTensor().select(1, -1);  // logits (B, 1, vocab) -> (B, vocab)
  }

 private:
  torch::jit::script::Module module_;
  torch::Device device_;
  std::vector<torch::Tensor> past_;  // past_key_values.{i}.key, .value
};

std::unique_ptr<CacheModel> load(const std::string& path, torch::Device device) {
  auto ends_with = [&](const std::string& s) {
    return path.size() >= s.size() && path.compare(path.size() - s.size(), s.size(), s) == 0;
  };
  if (ends_with(".pt2")) return std::make_unique<AotiModel>(path, device);
  if (ends_with(".ts")) return std::make_unique<TorchScriptModel>(path, device);
  throw std::runtime_error("--model must be a .pt2 (AOTInductor) or .ts (TorchScript) file: " + path);
}

torch::Tensor row(const std::vector<int64_t>& ids, torch::Device device) {
  return torch::tensor(ids, torch::kLong).view({1, -1}).to(device);
}

// Greedy generation, batch 1, with generation.py's overflow rule ("rebase").
std::vector<int64_t> generate(CacheModel& model, std::vector<int64_t> tokens, int64_t max_new,
                              int64_t stop_id, torch::Device device) {
  const int64_t window = model.config.block_size, keep = std::max<int64_t>(1, window / 2);
  if (static_cast<int64_t>(tokens.size()) > window) tokens.erase(tokens.begin(), tokens.end() - window);
  std::vector<int64_t> out;
  int64_t length = 0;  // positions filled in the window
  torch::Tensor logits;
  for (int64_t step = 0; step < max_new; ++step) {
    if (step == 0 || length >= window) {  // the prompt, or a full window: (re-)prefill
      std::vector<int64_t> rows(tokens.end() - std::min<int64_t>(tokens.size(), step ? keep : window),
                                tokens.end());
      logits = model.prefill(row(rows, device));
      length = rows.size();
    } else {
      logits = model.decode(row({tokens.back()}, device));
      length += 1;
    }
    int64_t next = logits.argmax(-1).item<int64_t>();
    if (next == stop_id) break;
    tokens.push_back(next);
    out.push_back(next);
  }
  return out;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) ids.push_back(std::stoll(item));
  if (ids.empty()) throw std::runtime_error("--ids needs at least one token id");
  return ids;
}

int run(int argc, char** argv) {
  std::string model_path, ids_text, device_name = "cpu";
  int64_t max_new = 32, stop_id = kEndOfText;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--model") model_path = value;
    else if (flag == "--ids") ids_text = value;
    else if (flag == "--max-new-tokens") max_new = std::stoll(value);
    else if (flag == "--device") device_name = value;
    else if (flag == "--stop-id") stop_id = std::stoll(value);
    else throw std::runtime_error("unknown flag " + flag);
  }
  if (model_path.empty() || ids_text.empty() || argc % 2 == 0)
    throw std::runtime_error("usage: slm-run --model model_kv.pt2|model_kv.ts --ids 7454,2402,257,640 "
                             "[--max-new-tokens 32] [--device cpu|cuda] [--stop-id 50256]");
  c10::InferenceMode inference;
  torch::Device device(device_name);
  auto start = std::chrono::steady_clock::now();
  auto model = load(model_path, device);
  auto loaded = std::chrono::steady_clock::now();
  auto tokens = generate(*model, parse_ids(ids_text), max_new, stop_id, device);
  auto done = std::chrono::steady_clock::now();
  for (size_t i = 0; i < tokens.size(); ++i) std::cout << (i ? "," : "") << tokens[i];
  std::cout << std::endl;
  auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  std::fprintf(stderr, "load %.0f ms, %zu tokens in %.0f ms (%.1f tokens/s)\n", ms(start, loaded),
               tokens.size(), ms(loaded, done), 1000.0 * tokens.size() / ms(loaded, done));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
  }
  return 2;
}
