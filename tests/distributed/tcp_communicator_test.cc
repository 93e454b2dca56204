// The TCP ring communicator on loopback, one thread per rank: collectives over 2, 3 and 4
// ranks with odd sizes against sums done here (integer-valued floats: exact in any order),
// bit-identical reruns, broadcast from every root across several pipeline chunks, a peer that
// dies, a peer that hangs (timeout), a stranger without the session key, and Abort.
#include "distributed/tcp_communicator.h"

#include <cmath>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain {
namespace {

using ::testing::HasSubstr;

const std::string kKey(32, 'k');

// Makes `world` connected communicators (rank r at index r).
std::vector<std::unique_ptr<TcpCommunicator>> Ring(int world, absl::Duration timeout,
                                                   const std::string& key = kKey) {
  std::vector<std::unique_ptr<TcpListener>> listeners;
  std::vector<TcpPeer> peers;
  for (int r = 0; r < world; ++r) {
    absl::StatusOr<std::unique_ptr<TcpListener>> l = TcpListener::Bind("127.0.0.1");
    EXPECT_TRUE(l.ok()) << l.status();
    peers.push_back({r, "localhost", (*l)->address(), 100 + r});
    listeners.push_back(*std::move(l));
  }
  std::vector<std::unique_ptr<TcpCommunicator>> comms(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      absl::StatusOr<std::unique_ptr<TcpCommunicator>> c =
          TcpCommunicator::Connect(std::move(listeners[r]), r, peers, key, timeout);
      EXPECT_TRUE(c.ok()) << c.status();
      if (c.ok()) comms[r] = *std::move(c);
    });
  }
  for (auto& t : threads) t.join();
  return comms;
}

// Runs fn(rank) on every rank at once.
void OnAll(int world, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) threads.emplace_back(fn, r);
  for (auto& t : threads) t.join();
}

TEST(TcpCommunicator, CollectivesMatchSumsOnEveryWorldSize) {
  for (int world : {1, 2, 3, 4}) {
    auto comms = Ring(world, absl::Seconds(20));
    ASSERT_EQ(comms.size(), static_cast<size_t>(world));
    EXPECT_EQ(comms[0]->local_size(), world);
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{1000003}}) {
      std::vector<std::vector<float>> data(world, std::vector<float>(n));
      std::vector<std::vector<double>> dd(world, std::vector<double>(3));
      for (int r = 0; r < world; ++r) {
        for (int64_t i = 0; i < n; ++i) data[r][i] = static_cast<float>((i * 7 + r * 13) % 101);
        dd[r] = {1.0 * r, 2.5, -r * 0.25};
      }
      std::vector<float> want(n, 0);
      for (int r = 0; r < world; ++r) {
        for (int64_t i = 0; i < n; ++i) want[i] += data[r][i];
      }
      OnAll(world, [&](int r) {
        ASSERT_TRUE(comms[r]->AllReduceSum(data[r].data(), n).ok());
        ASSERT_TRUE(comms[r]->AllReduceSum(dd[r].data(), 3).ok());
      });
      for (int r = 0; r < world; ++r) {
        EXPECT_EQ(data[r], want) << "world " << world << " n " << n << " rank " << r;
        EXPECT_EQ(dd[r][1], 2.5 * world);
      }
    }
    // Reduce-scatter, all-gather, all-gather of bytes.
    const int64_t count = 777;
    std::vector<std::vector<float>> send(world, std::vector<float>(count * world));
    std::vector<std::vector<float>> recv(world, std::vector<float>(count));
    std::vector<std::vector<float>> gathered(world, std::vector<float>(count * world));
    for (int r = 0; r < world; ++r) {
      for (int64_t i = 0; i < count * world; ++i) send[r][i] = static_cast<float>(i % 17 + r);
    }
    OnAll(world, [&](int r) {
      ASSERT_TRUE(comms[r]->ReduceScatterSum(send[r].data(), recv[r].data(), count).ok());
      ASSERT_TRUE(comms[r]->AllGather(recv[r].data(), gathered[r].data(), count).ok());
      ASSERT_TRUE(comms[r]->Barrier().ok());
    });
    for (int r = 0; r < world; ++r) {
      for (int64_t i = 0; i < count * world; ++i) {
        float want = 0;
        for (int q = 0; q < world; ++q) want += send[q][i];
        ASSERT_EQ(gathered[r][i], want) << "rank " << r << " element " << i;
      }
    }
    // Broadcast of 3.5 pipeline chunks from every root.
    for (int root = 0; root < world; ++root) {
      const size_t bytes = 3 * (1 << 20) + (1 << 19) + 3;
      std::vector<std::string> buf(world, std::string(bytes, '\0'));
      for (size_t i = 0; i < bytes; ++i) buf[root][i] = static_cast<char>(i * 31 + root);
      OnAll(world, [&](int r) {
        ASSERT_TRUE(comms[r]->Broadcast(buf[r].data(), bytes, root).ok());
      });
      for (int r = 0; r < world; ++r) EXPECT_EQ(buf[r], buf[root]) << "root " << root;
    }
  }
}

TEST(TcpCommunicator, NonIntegerSumsAreReproducible) {
  auto run = [] {
    auto comms = Ring(3, absl::Seconds(20));
    std::vector<std::vector<float>> data(3, std::vector<float>(10001));
    for (int r = 0; r < 3; ++r) {
      for (size_t i = 0; i < data[r].size(); ++i) data[r][i] = std::sin(0.1f * i + r) / 3.0f;
    }
    OnAll(3, [&](int r) { ASSERT_TRUE(comms[r]->AllReduceSum(data[r].data(), 10001).ok()); });
    EXPECT_EQ(data[0], data[1]);
    EXPECT_EQ(data[0], data[2]);
    return data[0];
  };
  EXPECT_EQ(run(), run());
}

TEST(TcpCommunicator, ADeadPeerIsNamedAtOnce) {
  auto comms = Ring(3, absl::Seconds(30));
  comms[1].reset();  // rank 1 dies: its sockets close
  std::vector<float> x(100, 1);
  const absl::Time t0 = absl::Now();
  absl::Status s = comms[2]->AllReduceSum(x.data(), 100);  // rank 2 receives from rank 1
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("rank 1 (host localhost, pid 101"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("closed its connection"));
}

TEST(TcpCommunicator, AHungPeerTimesOut) {
  auto comms = Ring(2, absl::Milliseconds(500));
  comms[0]->SetActivity("step 12");
  std::vector<float> x(10, 1);
  const absl::Time t0 = absl::Now();
  absl::Status s = comms[0]->AllReduceSum(x.data(), 10);  // rank 1 never calls
  const absl::Duration took = absl::Now() - t0;
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("(step 12)"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("rank 1"));
  EXPECT_GE(took, absl::Milliseconds(450));
  EXPECT_LT(took, absl::Seconds(3));
}

TEST(TcpCommunicator, AbortFailsTheCurrentAndLaterCalls) {
  auto comms = Ring(2, absl::Seconds(30));
  std::vector<float> x(10, 1);
  absl::Status blocked;
  std::thread waiter([&] { blocked = comms[0]->AllReduceSum(x.data(), 10); });
  absl::SleepFor(absl::Milliseconds(100));
  comms[0]->Abort("the parameter service says rank 1 is dead");
  waiter.join();
  EXPECT_EQ(blocked.code(), absl::StatusCode::kAborted);
  EXPECT_THAT(std::string(blocked.message()), HasSubstr("rank 1 is dead"));
  EXPECT_EQ(comms[0]->Barrier().code(), absl::StatusCode::kAborted);
}

TEST(TcpCommunicator, ConnectionsWithoutTheSessionKeyAreRefused) {
  // Rank 1 of a ring with another key never gets accepted: rank 0 times out waiting for it.
  auto l0 = TcpListener::Bind("127.0.0.1");
  auto l1 = TcpListener::Bind("127.0.0.1");
  ASSERT_TRUE(l0.ok() && l1.ok());
  std::vector<TcpPeer> peers = {{0, "h", (*l0)->address(), 1}, {1, "h", (*l1)->address(), 2}};
  absl::StatusOr<std::unique_ptr<TcpCommunicator>> c0, c1;
  std::thread t1([&] {
    c1 = TcpCommunicator::Connect(*std::move(l1), 1, peers, std::string(32, 'x'),
                                  absl::Milliseconds(800));
  });
  c0 = TcpCommunicator::Connect(*std::move(l0), 0, peers, kKey, absl::Milliseconds(800));
  t1.join();
  EXPECT_FALSE(c0.ok());
  EXPECT_FALSE(c1.ok());
  EXPECT_THAT(std::string(c0.status().message()), HasSubstr("did not connect"));
}

}  // namespace
}  // namespace qtrain
