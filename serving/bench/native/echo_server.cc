// A gRPC server in C++ that answers promptier.v1.Router/Classify with a constant and does no work:
// the floor a compiled gRPC front end would set on this machine (`promptier loadtest` builds and runs
// it when g++ and Debian's libgrpc++-dev are present). It is not a Promptier server.
//
// Info reports how many Classify calls were answered (model_version = "echo:<count>"), so the load
// test can check that every call it timed was answered OK, as it does with the real server's metrics.
//
// Usage: echo_server PORT
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <iostream>
#include <string>

#include "promptier/v1/router.grpc.pb.h"

namespace {

class EchoRouter final : public promptier::v1::Router::CallbackService {
 public:
  grpc::ServerUnaryReactor* Classify(grpc::CallbackServerContext* context,
                                     const promptier::v1::ClassifyRequest* /*request*/,
                                     promptier::v1::ClassifyResponse* response) override {
    response->set_tier("small");
    answered_.fetch_add(1, std::memory_order_relaxed);
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* Info(grpc::CallbackServerContext* context, const promptier::v1::InfoRequest* /*request*/,
                                 promptier::v1::InfoResponse* response) override {
    response->set_model_version("echo:" + std::to_string(answered_.load()));
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  std::atomic<long long> answered_{0};
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: echo_server PORT\n";
    return 2;
  }
  EchoRouter service;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(std::string("127.0.0.1:") + argv[1], grpc::InsecureServerCredentials());
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server) {
    std::cerr << "could not bind 127.0.0.1:" << argv[1] << "\n";
    return 1;
  }
  server->Wait();
  return 0;
}
